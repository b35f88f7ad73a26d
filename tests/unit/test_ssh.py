import os

import paramiko
import pytest

from provision.ssh import KnownHosts


def _line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def test_known_hosts_are_parsed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ssh/known_hosts
    a, b = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    f = tmp_path / "known_hosts"
    f.write_text(_line("10.0.0.1", a) + _line("[10.0.0.2]:2222", b))
    assert KnownHosts.known("10.0.0.1", str(f)) == {a.get_name(): a}
    assert KnownHosts.known("[10.0.0.2]:2222", str(f)) == {b.get_name(): b}
    assert KnownHosts.known("10.0.0.2", str(f)) == {}
    assert KnownHosts.keys(str(f)) is KnownHosts.keys(str(f))  # parsed once
    before = f.stat()
    f.write_text(_line("10.0.0.1", b) + _line("[10.0.0.2]:2222", a))  # the same size, the same file
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    assert KnownHosts.known("10.0.0.1", str(f)) == {b.get_name(): b}
    assert KnownHosts.known("10.0.0.1", str(tmp_path / "missing")) == {}


def test_the_users_known_hosts_come_first_and_an_unreadable_own_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    a, b = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh/known_hosts").write_text(_line("web1", a))
    own = tmp_path / "own"
    own.write_text(_line("web1", b) + _line("web2", b))
    assert KnownHosts.known("web1", str(own)) == {a.get_name(): a}
    assert KnownHosts.known("web2", str(own)) == {b.get_name(): b}
    assert KnownHosts.known("web2", None) == {}
    with pytest.raises(OSError):
        KnownHosts.known("web3", str(tmp_path))  # a directory
