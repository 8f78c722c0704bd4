"""The `redis:` config section: defaults, limits, path-precise errors, no secret echoed."""

from __future__ import annotations

import pytest

from portcullis.config import ConfigError, parse_config
from portcullis.traffic.config import RedisConfig

BASE = """
upstreams:
  api: {url: "http://127.0.0.1:9000"}
routes:
  - {name: health, path: /health, methods: [GET], upstream: api, public: true}
"""


def errors_of(redis_yaml: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + redis_yaml)
    return info.value.errors


def test_absent_by_default_and_defaults_when_present() -> None:
    assert parse_config(BASE).config.redis is None
    cfg = parse_config(BASE + "redis: {}\n").config.redis
    assert cfg is not None
    assert cfg.url == "redis://127.0.0.1:6379/0"
    assert cfg.on_failure.limits == "closed"  # fail closed unless told otherwise
    assert cfg.on_failure.replay == "closed"
    assert cfg.timeout_ms <= 100 and cfg.connect_timeout_ms <= 100


def test_full_section() -> None:
    cfg = parse_config(BASE + """
redis:
  url: rediss://cache.internal:6380/2
  password_env: PORTCULLIS_REDIS_PASSWORD
  connect_timeout_ms: 20
  timeout_ms: 30
  pool_size: 64
  key_prefix: "pc:"
  on_failure: {limits: open, nodes: 4, probe_interval_ms: 500}
""").config.redis
    assert cfg is not None
    assert (cfg.on_failure.limits, cfg.on_failure.nodes, cfg.pool_size) == ("open", 4, 64)


def test_replay_can_never_fail_open() -> None:
    errs = errors_of("redis: {on_failure: {replay: open}}\n")
    assert len(errs) == 1
    assert errs[0].startswith("redis.on_failure.replay: replay caches always fail closed")


@pytest.mark.parametrize(("doc", "path"), [
    ("redis: {on_failure: {limits: maybe}}\n", "redis.on_failure.limits: "),
    ("redis: {on_failure: {nodes: 0}}\n", "redis.on_failure.nodes: "),
    ("redis: {timeout_ms: 0}\n", "redis.timeout_ms: "),
    ("redis: {pool_size: 0}\n", "redis.pool_size: "),
    ("redis: {key_prefix: 'has space'}\n", "redis.key_prefix: "),
    ("redis: {password_env: 'not-a-name'}\n", "redis.password_env: "),
    ("redis: {url: 'http://x'}\n", "redis.url: "),
    ("redis: {colour: blue}\n", "redis.colour: unknown key"),
])
def test_errors_name_the_exact_path(doc: str, path: str) -> None:
    errs = errors_of(doc)
    assert any(e.startswith(path) for e in errs), errs


def test_url_errors_never_echo_the_password() -> None:
    errs = errors_of("redis: {url: 'redis://user:hunter2@cache:notaport/0'}\n")
    assert errs and all("hunter2" not in e for e in errs)
    assert errs[0].startswith("redis.url: ")


def test_display_url_masks_the_password() -> None:
    cfg = RedisConfig(url="redis://user:hunter2@cache:6380/1")
    assert cfg.display_url() == "redis://user:***@cache:6380/1"
    assert "hunter2" not in repr(cfg)
    assert RedisConfig(url="redis://cache:6379/0").display_url() == "redis://cache:6379/0"
