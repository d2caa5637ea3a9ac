"""``vspemu verify``: online verify of a pair or copy group (like DRBD's online verify).

    vspemu verify -g G [-d P] [--mark] [--max-tracks 100] [--hash sha1|blake2b]

Sent to the primary (the system holding the P-VOLs) with the secondary's session as Remote-Authorization;
both systems hash their volumes' tracks in parallel and only digests cross the link. Prints, per pair, the
number of differing tracks, the first track numbers and the bytes; ``--mark`` (split pairs only) marks them
in the differential bitmap so the next ``vspemu pair resync`` copies them. See docs/verify.md.

Exit codes: 0 no differing track (or, with --mark, marked); 4 differing tracks found (without --mark);
2 the array refused the request (its messageId and message are printed); 3 bad usage.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from vspemu.cli.pair import (
    EXIT_OK,
    PRIMARY_URL,
    SECONDARY_URL,
    CaCert,
    Group,
    Insecure,
    PairName,
    Password,
    Primary,
    Secondary,
    User,
    _tls,
    arrays,
    console,
    run,
    tls_setting,
)
from vspemu.system.storage import DEFAULT_PASSWORD, DEFAULT_USER

EXIT_DIFFERS = 4


def print_report(r: dict[str, Any]) -> None:
    t = Table(box=box.SIMPLE, title=f"verify {r['copyGroupName']} ({r['hash']}, {r['trackSize'] // 1024} KiB "
                                    f"tracks, {r.get('seconds', 0):.1f} s)")
    for col in ("pair", "P-VOL", "S-VOL", "status", "tracks", "diff", "bytes", "first tracks", "marked"):
        t.add_column(col)
    for p in r["pairs"]:
        first = ",".join(str(x) for x in p["differingTracks"])
        if p["differingTrackCount"] > len(p["differingTracks"]):
            first += ",..."
        t.add_row(p["copyPairName"], str(p["pvolLdevId"]), str(p["svolLdevId"]), p["status"], str(p["tracks"]),
                  str(p["differingTrackCount"]), str(p["differingBytes"]), first or "-", str(p["marked"]))
    console.print(t)
    for p in r["pairs"]:
        console.print(f"{p['copyPairName']}: {p['differingTrackCount']} differing tracks")


def verify(
    group: Group,
    pair: PairName = None,
    mark: Annotated[bool, typer.Option("--mark", help="Mark the differing tracks for the next resync (the pair "
                                                      "must be split or suspended).")] = False,
    max_tracks: Annotated[int, typer.Option("--max-tracks", min=0, max=1000,
                                            help="Track numbers to list per pair.")] = 100,
    hash_name: Annotated[str | None, typer.Option("--hash", help="sha1 (default) or blake2b.")] = None,
    primary: Primary = PRIMARY_URL, secondary: Secondary = SECONDARY_URL,
    user: User = DEFAULT_USER, password: Password = DEFAULT_PASSWORD,
    insecure: Insecure = False, ca_cert: CaCert = None,
) -> None:
    """Online verify: compare P-VOL and S-VOL by per-track checksums computed on each side."""
    _tls["verify"] = tls_setting(insecure, ca_cert)

    def body() -> int:
        with arrays(primary, secondary, user, password) as a:
            path = a.object_path(group, pair)
            object_id = path.split("/", 1)[1]
            r = a.p.verify(object_id, a.s, mark=mark, max_tracks=max_tracks, hash=hash_name)
            print_report(r)
            return EXIT_DIFFERS if r["differingTrackCount"] and not mark else EXIT_OK

    run(body)
