"""The store file (mode, durability pragmas) and the config model."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from portcullis.governance import GovernanceConfig, GovernanceStore


def test_store_file_private_and_durable(tmp_path: Path) -> None:
    store = GovernanceStore(tmp_path / "data" / "governance.db")
    try:
        assert stat.S_IMODE((tmp_path / "data" / "governance.db").stat().st_mode) == 0o600
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 5000
        assert store.revision() == 0
    finally:
        store.close()
    reopened = GovernanceStore(tmp_path / "data" / "governance.db")  # reopening keeps the revision row
    try:
        assert reopened.revision() == 0
    finally:
        reopened.close()


def test_config_defaults_and_bounds(tmp_path: Path) -> None:
    cfg = GovernanceConfig()
    assert cfg.approvers == () and cfg.approver_role is None and cfg.break_glass_max_seconds == 3600
    for bad in ({"colour": "red"}, {"request_ttl_seconds": 10}, {"break_glass_max_seconds": 7 * 86400},
                {"request_ttl_seconds": 7200, "max_request_ttl_seconds": 3600}, {"approvers": ["bad name"]},
                {"approver_role": "a b"}, {"approver_tenant": "../x"}, {"break_glass_actors": [""]}):
        with pytest.raises(ValidationError):
            GovernanceConfig.model_validate(bad)
    rel = GovernanceConfig(policy_dir="policies").resolved(tmp_path)
    assert rel.policy_dir == str(tmp_path / "policies")
    absolute = GovernanceConfig(policy_dir="/srv/policies").resolved(tmp_path)
    assert absolute.policy_dir == "/srv/policies"
