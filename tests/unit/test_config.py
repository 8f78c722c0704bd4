"""Config validation: path-precise errors, unknown keys, deny by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from portcullis.config import ConfigError, load_config, parse_config

GOOD = """
upstreams:
  api: {url: "http://127.0.0.1:9000"}
rate_limits:
  std: {requests: 60, per_seconds: 60, burst: 10}
routes:
  - {name: health, path: /health, methods: [GET], upstream: api, public: true}
  - name: projects
    path: /v1/tenants/{tenant}/projects
    methods: [GET]
    upstream: api
    auth: [api_key]
    scopes: [projects:read]
    tenant_param: tenant
    rate_limit: std
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


def test_good_config() -> None:
    loaded = parse_config(GOOD)
    assert [r.name for r in loaded.config.routes] == ["health", "projects"]


def test_unknown_upstream_names_exact_path() -> None:
    text = GOOD.replace("upstream: api\n    auth", "upstream: billing\n    auth")
    assert "routes[1].upstream: unknown upstream 'billing'" in errors_of(text)


def test_unknown_key_is_error() -> None:
    text = GOOD.replace("upstreams:\n  api: {url", "upstreams:\n  api: {colour: red, url")
    assert "upstreams.api.colour: unknown key" in errors_of(text)


def test_route_without_auth_is_refused_unless_public() -> None:
    text = GOOD.replace("    auth: [api_key]\n", "")
    errs = errors_of(text)
    assert any(e.startswith("routes[1]: no auth requirement") for e in errs)


def test_public_route_cannot_require_scopes() -> None:
    text = GOOD.replace("public: true}", "public: true, scopes: [x]}")
    assert any("public route cannot" in e for e in errors_of(text))


def test_unknown_rate_limit_and_tenant_param() -> None:
    text = GOOD.replace("rate_limit: std", "rate_limit: gold").replace("tenant_param: tenant", "tenant_param: org")
    errs = errors_of(text)
    assert "routes[1].rate_limit: unknown rate limit 'gold'" in errs
    assert any(e.startswith("routes[1].tenant_param:") for e in errs)


def test_duplicate_routes() -> None:
    text = GOOD + "  - {name: health2, path: /health, methods: [GET], upstream: api, public: true}\n"
    assert any("duplicates routes[0]" in e for e in errors_of(text))


def test_bad_values_name_paths() -> None:
    text = GOOD.replace("requests: 60", "requests: -1").replace('"http://127.0.0.1:9000"', '"ftp://x"')
    errs = errors_of(text)
    assert any(e.startswith("rate_limits.std.requests:") for e in errs)
    assert any(e.startswith("upstreams.api.url:") for e in errs)


def test_yaml_errors_have_line_numbers() -> None:
    errs = errors_of("routes: [\n  {name: x\n")
    assert errs[0].startswith("line ")


def test_not_a_mapping() -> None:
    assert errors_of("- a\n- b\n") == ["(top level): expected a mapping of settings"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.errors[0]


def test_data_dir_relative_to_file(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(GOOD + "data_dir: state\n")
    assert load_config(p).data_dir == (tmp_path / "state").resolve()


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "examples" / "portcullis.yaml"
    loaded = load_config(example)
    assert loaded.config.routes


def test_route_audience_is_a_route_setting() -> None:
    loaded = parse_config(GOOD.replace("    rate_limit: std\n", "    rate_limit: std\n    audience: https://billing.example\n"))
    assert loaded.config.routes[1].audience == "https://billing.example"
