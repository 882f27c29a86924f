"""Fetch a Valkey server for the tests that run against Valkey as well as Redis.

``python -m tests.valkey DIR`` reads Debian's bookworm-backports index over HTTPS
(Debian's package registry, which CI may reach), downloads the ``valkey-server`` and
``valkey-tools`` packages it names, checks them against the index's SHA-256 sums, and
unpacks them into ``DIR`` with ``dpkg-deb -x``: nothing is installed on the system,
no service is started. It prints the server binary's path, or, when it cannot (no
network, not Debian, another architecture), says why on stderr and prints nothing,
so that ``make`` skips the Valkey pass instead of failing.
"""

from __future__ import annotations

import hashlib
import lzma
import pathlib
import subprocess
import sys
import tempfile
import urllib.request

MIRROR = "https://deb.debian.org/debian"
SUITE = "bookworm-backports"
PACKAGES = ("valkey-server", "valkey-tools")
TIMEOUT = 60.0


def _stanzas(index: str) -> dict[str, dict[str, str]]:
    """The index's packages by name: each stanza's fields (first lines only)."""
    found: dict[str, dict[str, str]] = {}
    for stanza in index.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        if fields.get("Package") in PACKAGES:
            found[fields["Package"]] = fields
    return found


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        data: bytes = response.read()
        return data


def fetch(into: pathlib.Path) -> pathlib.Path:
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()
    server = into / "usr" / "bin" / "valkey-server"
    if server.exists():
        return server
    index = lzma.decompress(_get(f"{MIRROR}/dists/{SUITE}/main/binary-{arch}/Packages.xz"))
    stanzas = _stanzas(index.decode())
    missing = [name for name in PACKAGES if name not in stanzas]
    if missing:
        raise LookupError(f"{SUITE} has no {', '.join(missing)} for {arch}")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PACKAGES:
            fields = stanzas[name]
            deb = _get(f"{MIRROR}/{fields['Filename']}")
            if hashlib.sha256(deb).hexdigest() != fields["SHA256"]:
                raise ValueError(f"{name}: the download does not match the index's SHA-256")
            path = pathlib.Path(tmp) / f"{name}.deb"
            path.write_bytes(deb)
            subprocess.run(["dpkg-deb", "-x", str(path), str(into)], check=True)
    if not server.exists():
        raise FileNotFoundError(f"{server} is not in the packages")
    return server


def main() -> int:
    into = pathlib.Path(sys.argv[1]).resolve()
    try:
        server = fetch(into)
    except (OSError, LookupError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"no Valkey server ({exc}): the Valkey pass will skip", file=sys.stderr)
        return 0
    print(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
