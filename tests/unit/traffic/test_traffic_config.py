"""`traffic:` in the config file: references and keys checked, errors with exact paths."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from portcullis.config import ConfigError, parse_config


def doc(traffic: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
        "rate_limits": {"gw": {"requests": 10, "per_seconds": 1, "burst": 10, "key": "global"},
                        "t": {"requests": 10, "per_seconds": 1, "burst": 10, "key": "tenant"}},
        "routes": [{"name": "r", "path": "/r", "methods": ["GET"], "upstream": "u", "public": True,
                    "rate_limit": "t"}],
        "traffic": traffic,
    })


def errors(traffic: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(traffic))
    return e.value.errors


def test_a_full_traffic_section_loads() -> None:
    loaded = parse_config(doc({
        "admission": ["gw"], "rate_limits": ["t"],
        "quotas": {"timezone": "Europe/Berlin", "per_tenant": {"day": 5}, "clients": {"c": {"month": 9}}},
        "concurrency": {"upstreams": {"u": {"max_concurrency": 5, "tenant_share": 0.5, "adaptive": {}}},
                        "per_tenant": 3},
        "abuse": {"threshold": 10}, "adaptive": {"warmup_seconds": 60, "trusted_tenants": {"acme": 2}},
    }))
    t = loaded.config.traffic
    assert t.quotas.enabled and t.concurrency.enabled and t.abuse is not None


def test_old_configs_are_unchanged() -> None:
    t = parse_config(doc({})).config.traffic
    assert not t.quotas.enabled and not t.concurrency.enabled and t.abuse is None and t.adaptive is None


@pytest.mark.parametrize(("traffic", "message"), [
    ({"rate_limits": ["nope"]}, "traffic.rate_limits[0]: unknown rate limit 'nope'"),
    ({"admission": ["t"]}, "traffic.admission[0]: 't' is counted per tenant, which is not known before "
                           "authentication; admission limits need key 'global' or 'ip'"),
    ({"admission": ["gw", "gw"]}, "traffic.admission[1]: 'gw' is listed twice"),
    ({"admission": ["gw"], "rate_limits": ["gw"]},
     "traffic.admission[0]: 'gw' is also in traffic.rate_limits; it would count every request twice"),
    ({"concurrency": {"upstreams": {"billing": {"max_concurrency": 1}}}},
     "traffic.concurrency.upstreams.billing: unknown upstream 'billing'"),
    ({"quotas": {"timezone": "Mars/Base"}},
     "traffic.quotas.timezone: unknown time zone 'Mars/Base' (an IANA name such as 'Europe/Berlin' or 'UTC')"),
    ({"quotas": {"per_tenant": {}}}, "traffic.quotas.per_tenant: set 'day', 'month' or both"),
    ({"abuse": {"statuses": [502]}},
     "traffic.abuse.statuses: 502 is not a 4xx status (server errors are not the client's doing)"),
    ({"bogus": 1}, "traffic.bogus: unknown key"),
])
def test_errors_name_the_exact_path(traffic: dict[str, Any], message: str) -> None:
    assert message in errors(traffic)
