"""`fab -H root@ADDRESS bootstrap`: a fresh host made safe, without ever locking the operator out.

The phases of :mod:`provision.bootstrap` run one apply each, with fresh SSH connections between
them: the deploy user's login (with sudo) is verified before root's login is turned off and again
after sshd reloaded; when either fails, what the run changed is put back over the connection still
open (sessions survive an sshd reload) and the host stays as it was. The firewall's change is
undone by a timer on the host unless a fresh connection confirms it. Re-run, it changes nothing;
when root's login is refused (bootstrapped already) it goes on as the deploy user.
"""

from __future__ import annotations

import os
import time

import paramiko
from invoke import Exit

from .. import bootstrap as boot
from ..app import proxy_env
from ..errors import AuthFailed, ProvisionError, StepFailed, Unreachable
from ..facts import gather
from ..fleet import exit_code, run_fleet
from ..hosts import Job, jobs
from ..output import Printer, summary_line, summary_table
from ..runner import HostResult, run_steps
from ..ssh import Remote, connect
from . import guarded


def operator_keys(job: Job) -> tuple[str, ...]:
    """The public keys the deploy user gets: ``deploy_keys``, else the connection's key's (read
    from the private key, else from its .pub file). Decided locally, before any connection."""
    s, t = job.settings, job.target
    if s.deploy_keys:
        return s.deploy_keys
    if not t.key:
        raise ProvisionError(f"{t.alias}: no public key to give {s.deploy_user}; pass -i KEY, set key= in the "
                             "inventory, or list public key files in app.deploy_keys")
    return (public_key_of(t.key, t.alias),)


def public_key_of(key: str, label: str) -> str:
    """The public key ("TYPE BASE64") of private key file ``key``: read from it, else from its .pub file."""
    path = os.path.expanduser(key)
    try:
        k = paramiko.PKey.from_path(path)
        return f"{k.get_name()} {k.get_base64()}"
    except (paramiko.SSHException, OSError, ValueError):
        pass
    try:
        with open(path + ".pub") as fh:
            line = fh.read().strip()
    except OSError:
        line = ""
    if not line or not line.split()[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ProvisionError(f"{label}: cannot read the public key of {key} (protected by a passphrase, or not a "
                             f"key, and no {key}.pub beside it); list public key files in app.deploy_keys")
    return " ".join(line.split()[:2])


RELOAD_GRACE = 5  # seconds a fresh login waits for sshd's socket, which a reload closes for a moment


class Bootstrap:
    """One host's bootstrap: connections, phases, verifications, reverts."""

    def __init__(self, job: Job, config, printer: Printer, keys: tuple[str, ...], accept_new: bool = False,
                 confirm_seconds: int = boot.FIREWALL_CONFIRM_SECONDS):
        self.job, self.config, self.printer, self.keys = job, config, printer, keys
        self.accept_new, self.seconds = accept_new, confirm_seconds
        self.label = job.target.alias
        self.result = HostResult(self.label)
        self.remote: Remote | None = None

    # -- connections
    def connect(self, user: str) -> Remote:
        t = self.job.target
        return connect(t.host, user, t.port, t.key, t.known_hosts, config=self.config, label=self.label,
                       accept_new_host_key=self.accept_new)

    def login(self) -> Remote:
        """As the selected user; when that is root and root's login is refused, as the deploy user."""
        t, deploy = self.job.target, self.job.settings.deploy_user
        try:
            return self.connect(t.user)
        except AuthFailed as e:
            if t.user != "root":
                raise
            try:
                remote = self.connect(deploy)
            except AuthFailed:
                raise e from None
        self.printer.line(f"{self.label}: root's login is refused (bootstrapped already): going on as {deploy}, "
                          "through sudo")
        return remote

    def reconnect(self, user: str) -> Remote:
        """A new connection as ``user``, tried again for a moment while it is refused: sshd
        re-executes itself on reload, and its socket is closed meanwhile."""
        deadline = time.monotonic() + RELOAD_GRACE
        while True:
            try:
                return self.connect(user)
            except Unreachable as e:
                if "connection refused" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def why(self, e: ProvisionError) -> str:
        return str(e).removeprefix(f"{self.label}: ")

    def fresh_login(self, user: str, command: str = "id -u") -> str | None:
        """A new connection as ``user`` runs ``command`` through sudo (prints 0 for `id -u`): None, or why not."""
        try:
            r = self.reconnect(user)
        except ProvisionError as e:
            return self.why(e)
        try:
            rc, out, err = r.exec(f"{r.sudo}{command}", timeout=30)
        except ProvisionError as e:
            return self.why(e)
        finally:
            r.close()
        if rc != 0 or (command == "id -u" and out.strip() != "0"):
            return f"`{r.sudo}{command}` as {user} failed (exit {rc}): {(err or out).strip()[-300:]}"
        return None

    def root_still_logs_in(self) -> str | None:
        """A fresh connection as root with the operator's key, which must be refused: None, or why not."""
        try:
            r = self.reconnect("root")
        except AuthFailed:
            return None
        except Unreachable as e:
            return f"after sshd reloaded, a fresh login as root could not be tried ({self.why(e)})"
        r.close()
        return ("after sshd reloaded, root still logs in (a Match block or an sshd_config file read before "
                f"{boot.SSHD_DROPIN} lets it: take that out)")

    # -- phases
    def apply(self, phase: boot.Phase, dry_run: bool = False) -> HostResult:
        r = run_steps(self.remote, phase, dry_run=dry_run, printer=self.printer, env=proxy_env(self.job.settings))
        offset = len(self.result.planned)
        self.result.planned += r.planned
        self.result.done |= {offset + i for i in r.done}
        return r

    def undo(self, *phases: boot.Phase) -> str:
        """Put back what ``phases`` changed, latest first: '' when done, else why not."""
        for phase in phases:
            steps = phase.undo()
            if not steps:
                continue
            self.printer.line(f"{self.label}: putting back what the {phase.title} phase changed")
            try:
                r = run_steps(self.remote, steps, printer=self.printer, env=proxy_env(self.job.settings))
            except ProvisionError as e:
                return str(e)
            if r.error:
                return r.error
        return ""

    def fail(self, why: str, *undo: boot.Phase, reverted: str = "") -> None:
        """Stop with ``why``, after putting back ``undo``'s changes."""
        problem = self.undo(*undo) if undo else ""
        if problem:
            raise StepFailed(f"{self.label}: {why}; putting the host back FAILED too ({problem}); log in as "
                             f"{self.job.target.user} and check {boot.SSHD_DROPIN} and {boot.SUDOERS_FILE}")
        raise StepFailed(f"{self.label}: {why}; {reverted or 'the host is as it was before'}")

    def verified(self, what: str) -> None:
        self.printer.line(f"{self.label}: {'ok':<7} {what}")

    def run(self, dry_run: bool = False, ports: dict | None = None) -> HostResult:
        """``ports``: the firewall's ports instead of the settings' (tests only, see firewall_steps)."""
        s, t = self.job.settings, self.job.target
        deploy = s.deploy_user
        self.remote = remote = self.login()
        # One round trip before the phases: who the deploy user is, and which port this connection came in on
        pre = gather(remote, [("user", deploy), ("content", boot.BOOTSTRAP_MARKER), ("content", boot.SUDOERS_FILE)])
        user_fact = pre.user(deploy)
        unfit = boot.unfit_deploy_user(deploy, user_fact, pre.content(boot.BOOTSTRAP_MARKER),
                                       pre.content(boot.SUDOERS_FILE))
        if unfit:  # before anything changes
            raise ProvisionError(f"{self.label}: {unfit}")
        conn = remote.exec('printf %s "$SSH_CONNECTION"', timeout=30)[1].split()
        conn_port = int(conn[3]) if len(conn) == 4 and conn[3].isdigit() else None
        state: dict = {}

        def firewall(facts):
            state["ssh"] = boot.ssh_ports(facts[("sshd", "")] if facts else None, conn_port)
            return boot.firewall_steps(s, state["ssh"], self.seconds, ports)

        account = boot.Phase("account", lambda f: boot.account_steps(s, self.keys, f, user_fact))
        sshd = boot.Phase("sshd", lambda f: boot.sshd_steps(deploy), undo_after=boot.sshd_undo())
        wall = boot.Phase("firewall", firewall, facts=[("sshd", "")])
        upgrades = boot.Phase("upgrades", lambda f: boot.upgrades_steps(s, state.get("ssh", (t.port,))))
        if dry_run:
            for phase in (account, sshd, wall, upgrades):
                self.apply(phase, dry_run=True)
            self.printer.line(f"{self.label}: would verify a fresh login as {deploy} with sudo before and after sshd "
                              f"reloads, and confirm the firewall with a fresh login (else it is undone in "
                              f"{self.seconds}s)")
            return self.result

        r = self.apply(account)
        if r.error:
            self.fail("the account phase failed", account)
        why = self.fresh_login(deploy)
        if why:
            self.fail(f"a fresh login as {deploy} with sudo failed ({why}), so root's login stays on", account)
        self.verified(f"a fresh login as {deploy} has sudo")

        r = self.apply(sshd)
        if r.error:
            self.fail("sshd's config did not pass (see above)", sshd, account)
        if r.changed:
            why = self.fresh_login(deploy)
            if why:
                self.fail(f"after sshd reloaded, a fresh login as {deploy} with sudo failed ({why})", sshd, account)
            self.verified(f"after sshd reloaded, a fresh login as {deploy} has sudo")
            why = self.root_still_logs_in()
            if why:
                self.fail(why, sshd, account)
            self.verified("after sshd reloaded, a fresh login as root is refused")

        r = self.apply(wall)
        rules = boot.firewall_file(wall.steps(None))
        if r.error or r.changed:
            why = "" if r.error else self.fresh_login(deploy, f"sh -c {boot.q(boot.confirm_command(rules.content))}")
            if r.error or why:
                try:
                    rc, _, err = remote.exec(f"{remote.sudo}sh -c {boot.q(boot.revert_now())}", timeout=60)
                    undone = "the firewall is undone" if rc == 0 else f"undoing it failed ({err.strip()[-200:]})"
                except ProvisionError as e:
                    undone = f"this connection is cut too ({e}), so the timer on the host undoes it"
                problem = "the firewall did not load (see above)" if r.error else \
                    f"a fresh login through the new firewall failed ({why})"
                raise StepFailed(f"{self.label}: {problem}; {undone}: the account and sshd phases are done, "
                                 "re-run bootstrap to try again")
            self.verified(f"a fresh login through the firewall confirmed it (ports {rules_summary(state)})")

        r = self.apply(upgrades)
        if r.error:
            raise StepFailed(r.error)
        key = t.key or ""
        self.printer.line(f"{self.label}: bootstrapped: root's login is off; from now on connect as {deploy} "
                          f"(inventory.ini: {boot.inventory_line(t.alias, t.host, deploy, t.port, key)})")
        return self.result


def rules_summary(state: dict) -> str:
    return "SSH " + ", ".join(map(str, state.get("ssh", ()))) + ", 80, 443 and open_ports"


@guarded
def run_bootstrap(c, *, dry_run: bool = False, verbose: bool = False, accept_new_host_key: bool = False,
                  json_file: str | None = None) -> list[HostResult]:
    work = jobs(c, {})
    keys = {job.target.alias: operator_keys(job) for job in work}  # every host's, before touching any
    printer = Printer(verbose=verbose)

    def one(job: Job) -> HostResult:
        t0 = time.monotonic()
        b = Bootstrap(job, c.config, printer, keys[job.target.alias], accept_new_host_key)
        try:
            r = b.run(dry_run=dry_run)
        except ProvisionError as e:
            printer.error(str(e))
            r = b.result
            r.error, r.code = str(e), e.code
        finally:
            if b.remote is not None:
                b.remote.close()
        r.duration = time.monotonic() - t0
        printer.line(summary_line(r, dry_run))
        return r

    results = run_fleet(work, lambda j: j.target.alias, one)
    summary_table(results, printer, json_file)
    code = exit_code(results)
    if code:
        raise Exit(code=code)
    return results
