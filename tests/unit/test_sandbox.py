import pytest

from provision.sandbox import _pem_blocks


def test_pem_blocks_split_and_normalise():
    a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----"
    b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----"
    text = f"# comment\n{a}\n\n{b}\ntrailing garbage\n"
    assert _pem_blocks(text) == [a + "\n", b + "\n"]
    assert _pem_blocks("") == []


def test_the_sandbox_tasks_reach_the_sandbox_module(monkeypatch):
    """`fab sandbox.*` import provision.sandbox only when they run (off the deploy path)."""
    import provision.sandbox
    from provision.cli import sandbox as tasks
    from provision.errors import ProvisionError

    monkeypatch.setattr(provision.sandbox, "can_run", lambda: "no systemd-nspawn (test)")
    with pytest.raises(ProvisionError, match=r"cannot run sandbox droplets here: no systemd-nspawn \(test\)"):
        tasks._sandbox()
