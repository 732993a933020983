"""The service's own count of the RPCs it answered, by status code, from its metrics endpoint.

h2load counts HTTP statuses only, and a gRPC error is an HTTP 200 too: the difference of
`integrations_rpc_requests_total{code}` over a load is what the server itself answered.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter

_SAMPLE = re.compile(r"^integrations_rpc_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)\s*$", re.M)
_CODE = re.compile(r'code="([A-Z_]+)"')


def parse_rpc_counts(text: str) -> Counter[str]:
    """Prometheus text exposition -> calls per gRPC code name, summed over methods."""
    counts: Counter[str] = Counter()
    for sample in _SAMPLE.finditer(text):
        code = _CODE.search(sample.group("labels"))
        if code:
            counts[code.group(1)] += int(float(sample.group("value")))
    return counts


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def rpc_counts(address: str) -> Counter[str]:
    return parse_rpc_counts(await asyncio.to_thread(_scrape, address))


def not_ok(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Codes other than OK answered between two scrapes, and how many of each."""
    return {code: after[code] - before[code] for code in after if code != "OK" and after[code] > before[code]}
