import sys

from integrations_service.cli import main

sys.exit(main())
