"""SSH host keys with OpenSSH's discipline: parse known_hosts, compare the keys a host offers with the pinned ones.

Pure domain code: no SSH, no files. `tasks.hostkeys` fetches the offered keys (ssh-keyscan) and keeps the
cluster's known_hosts; the preflight refuses a host whose verdict is `refused`.

Policies (config `ssh_host_key_checking`):
* ``accept-new``: a host with no pinned key is trusted on first use and pinned; a pinned key that differs is
  refused (OpenSSH's ``StrictHostKeyChecking=accept-new``).
* ``strict``: a host must already be pinned (``StrictHostKeyChecking=yes``).
* ``off``: nothing is checked (``StrictHostKeyChecking=no``, ``UserKnownHostsFile=/dev/null``).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
from dataclasses import dataclass

POLICIES = ("accept-new", "strict", "off")
# ssh-keyscan -t: every key type a current sshd offers.
SCAN_TYPES = "ed25519,ecdsa,rsa"


@dataclass(frozen=True)
class HostKey:
    type: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa
    blob: str  # base64, as in known_hosts

    @property
    def fingerprint(self) -> str:
        """SHA256:<base64 without padding>, as `ssh-keygen -lf` and ssh's warnings print it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def describe(self) -> str:
        return f"{self.type} {self.fingerprint}"


@dataclass(frozen=True)
class KnownHost:
    """One known_hosts line: host patterns (or a hashed name), the key, and where the line is."""

    hosts: str
    key: HostKey
    marker: str = ""  # "", "@revoked" or "@cert-authority"
    where: str = ""  # file:line

    def matches(self, host: str) -> bool:
        """Whether this line is about `host` (an address on port 22), as OpenSSH matches it."""
        if self.hosts.startswith("|1|"):
            return _hashed_match(self.hosts, host)
        matched = False
        for pattern in self.hosts.split(","):
            negated = pattern.startswith("!")
            if fnmatch.fnmatchcase(host.lower(), pattern.lstrip("!").lower()):
                if negated:
                    return False
                matched = True
        return matched


def _hashed_match(field: str, host: str) -> bool:
    """`|1|base64(salt)|base64(HMAC-SHA1(salt, host))`, what HashKnownHosts writes."""
    try:
        _, _, salt, digest = field.split("|")
        want = base64.b64decode(digest)
        got = hmac.new(base64.b64decode(salt), host.encode(), hashlib.sha1).digest()
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(want, got)


def _key(key_type: str, blob: str) -> HostKey | None:
    try:
        base64.b64decode(blob, validate=True)
    except (ValueError, binascii.Error):
        return None
    return HostKey(key_type, blob)


def parse_known_hosts(text: str, source: str = "known_hosts") -> list[KnownHost]:
    """Every usable line of a known_hosts file; comments, blank and malformed lines are skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        if len(fields) < 3 or not (key := _key(fields[1], fields[2])):
            continue
        entries.append(KnownHost(fields[0], key, marker, f"{source}:{number}"))
    return entries


def parse_keyscan(text: str) -> dict[str, list[HostKey]]:
    """ssh-keyscan's stdout (`host type base64` lines) -> host -> the keys it offered."""
    offered: dict[str, list[HostKey]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and (key := _key(fields[1], fields[2])):
            offered.setdefault(fields[0], []).append(key)
    return offered


def known_hosts_line(address: str, key: HostKey) -> str:
    return f"{address} {key.type} {key.blob}\n"


@dataclass(frozen=True)
class HostKeyVerdict:
    node: str
    address: str
    status: str  # known, new, changed, revoked, unknown (strict, not pinned), silent (no key offered), off
    refused: bool
    detail: str
    offered: tuple[HostKey, ...] = ()

    @property
    def message(self) -> str:
        return f"{self.node}: {self.detail}"


def judge_host_key(
    node: str, address: str, offered: list[HostKey], known: list[KnownHost], policy: str
) -> HostKeyVerdict:
    """Compare what `address` offers now with the lines of `known` about it, under `policy`.

    A changed key is refused under every policy but `off`: a pinned key type offered with another key, or no
    pinned key type offered at all. A host that offers nothing is not judged here (`silent`): the SSH
    connection that follows reports it unreachable.
    """
    offered_t = tuple(offered)
    if policy == "off":
        return HostKeyVerdict(
            node, address, "off", False, f"{address}: not checked (ssh_host_key_checking: off)", offered_t
        )
    if not offered:
        return HostKeyVerdict(
            node, address, "silent", False, f"{address} offered no host key (not answering on port 22)"
        )
    mine = [e for e in known if e.matches(address)]
    revoked = [e for e in mine if e.marker == "@revoked" and e.key in offered]
    if revoked:
        old = revoked[0]
        detail = f"{address} offers the revoked host key {old.key.describe()} ({old.where}); nothing runs there"
        return HostKeyVerdict(node, address, "revoked", True, detail, offered_t)
    pinned = [e for e in mine if not e.marker]
    if not pinned:
        if policy == "strict":
            first = offered[0]
            detail = (
                f"host key of {address} not known, and ssh_host_key_checking is strict; "
                f"it offers {_describe(offered)}. "
                "Check that fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
                f"then add the key to the file ssh_known_hosts names (ssh-keyscan -t {first.type} {address})"
            )
            return HostKeyVerdict(node, address, "unknown", True, detail, offered_t)
        return HostKeyVerdict(node, address, "new", False, f"{address}: new host key {_describe(offered)}", offered_t)
    changed = None
    for key in offered:
        same_type = [e for e in pinned if e.key.type == key.type]
        if same_type and all(e.key != key for e in same_type):
            changed = (same_type[0], key)
            break
    if changed is None and not any(e.key in offered for e in pinned):
        changed = (pinned[0], offered[0])  # no pinned key type is offered any more
    if changed:
        old, new = changed
        detail = (
            f"HOST KEY CHANGED for {address}: pinned {old.key.describe()} ({old.where}), offered now {new.describe()}; "
            "nothing runs on this host. If it was reinstalled, check the new fingerprint out of band, then "
            f"remove the old key: ssh-keygen -R {address} -f {old.where.rpartition(':')[0]}"
        )
        return HostKeyVerdict(node, address, "changed", True, detail, offered_t)
    match = next(e for e in pinned if e.key in offered)
    return HostKeyVerdict(node, address, "known", False, f"{address}: pinned {match.key.describe()}", offered_t)


def _describe(keys: list[HostKey]) -> str:
    return ", ".join(k.describe() for k in keys)
