"""The sealing layer: between the domain and the store, the only code that turns clear text into stored values.

Layers: api -> domain -> sealing -> crypto and store. `sealer.Sealer` seals
and unseals; `legacy` is its policy for legacy stored values.
"""

from integrations_service.sealing.legacy import LegacyPolicy, LegacyValues
from integrations_service.sealing.sealer import Sealer, Target, holds_no_clear_text, target_of

__all__ = ["LegacyPolicy", "LegacyValues", "Sealer", "Target", "holds_no_clear_text", "target_of"]
