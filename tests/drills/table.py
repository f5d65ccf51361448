"""Turns the drills' JSON lines (`SMTPGW_DRILL_REPORT=FILE`) into the Markdown table of
README's "Durability" section:

    SMTPGW_DRILL_REPORT=/tmp/drills.jsonl .venv/bin/python -m pytest tests/drills -q -s
    .venv/bin/python tests/drills/table.py /tmp/drills.jsonl
"""

from __future__ import annotations

import json
import re
import sys

COUNTS = ("sent", "ok", "temp", "found", "lost", "duplicated")
# The figures worth a column of their own, in seconds; everything else goes to "notes".
TIMES = {
    "down_s": "gateway down",
    "recovery_s": "first 250 after the broker's return",
    "drained_after_s": "backlog forwarded after the broker's return",
    "readyz_503_after_s": "/readyz 503 after SIGTERM",
    "exit_after_s": "exit 0 after SIGTERM",
    "ready_after_s": "/readyz 200 after space returned",
    "first_250_after_s": "first 250 after space returned",
    "restart_s": "restart to /readyz 200",
}
NOTES = {
    "451_during_outage": "{} × 451 during the outage",
    "acked_during_outage": "{} × 250 during the outage",
    "rate_before": "250s {:.0f}/s before",
    "rate_after": "{:.0f}/s after",
    "in_flight_250": "{} in flight at SIGTERM: 250",
    "load_421": "{} × 421 to new commands",
    "452_while_full": "{} × 452 while full",
    "451_while_full": "{} × 451 while full",
    "idle_220": "{} idle connections greeted",
    "flood_421": "{} flood connections got 421",
    "rate_during": "{:.0f}/s during the flood",
    "flood_per_s": "flood {:.0f} connections/s",
}


def row(entry: dict) -> str:
    match = re.fullmatch(r"(.*) \[(\w+)\]", entry["drill"])
    name, backend = match.groups() if match else (entry["drill"], "")
    times = [f"{label} {entry[key]:.2f} s" for key, label in TIMES.items() if key in entry]
    notes = [text.format(entry[key]) for key, text in NOTES.items() if key in entry]
    cells = [name, backend, *(str(entry[k]) for k in COUNTS), "; ".join(times + notes)]
    return "| " + " | ".join(cells) + " |"


def main(path: str) -> None:
    print("| drill | backend | sent | 250 | 4xx | found | lost | duplicated | times and notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    with open(path) as f:
        for line in f:
            print(row(json.loads(line)))


if __name__ == "__main__":
    main(sys.argv[1])
