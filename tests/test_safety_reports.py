"""Found by the fault schedules (seeds 119, 1316, 1592, 2164...): a final report the server took
without answering was rewritten in the journal and sent again under the same report id.

Sequence: outcome A's report is not delivered (server down) and stays pending; at the next try
the server takes it but the answer is lost (the gateway keeps it pending, rightly: it cannot
know); the next outcome B of the same offer then *replaced* the pending row and was delivered
under A's report id. The server held two different reports with one id: a reader that drops
duplicates by ``report_id`` (what the id is for) kept A and lost B.

Now a report that was offered (sent at least once, marked before the request leaves) is never
rewritten: B gets its own id and goes after A (A is sent again, as it was, under its id), so
the server's last word is B. Only a report the server never saw is replaced. Checked here with
a stub server, against the journal directly (a gateway killed mid-send) and against the
loopback hawkBit server, where the action closed by A refuses B - kept as *refused* with the
server's reason, not lost and not pending forever.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer

from gateway import devkit
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Outcome, Status
from gateway.journal import Journal
from gateway.mcuboot import Version
from gateway.sources.base import DeviceView, FleetSource, Offer, Report, ReportNotDelivered, UpdateResult


class Server(FleetSource):
    """Keeps every final report it took; ``plan`` says what happens to the next ones."""

    name = "local"

    def __init__(self) -> None:
        self.took: list[Report] = []
        self.plan: list[str] = []

    async def check(self, device: DeviceView) -> Offer | None:
        return None

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        raise AssertionError("not used")

    async def report(self, offer: Offer, report: Report) -> None:
        if not report.finished:
            return
        what = self.plan.pop(0) if self.plan else "ok"
        if what == "down":
            raise ReportNotDelivered("503")
        self.took.append(report)
        if what == "lost-answer":
            raise ReportNotDelivered("connection dropped after the server took it")


async def test_a_report_the_server_may_hold_is_never_rewritten(tmp_path: Path) -> None:
    key = devkit.make_key(tmp_path / "k.pem")
    cfg = parse_config({
        "state_dir": str(tmp_path / "state"), "trusted_keys": [str(key)],
        "source": {"kind": "local", "path": str(tmp_path)},
        "retry": {"base_s": 0.001, "max_s": 0.001},
        "devices": [{"id": "d0", "hardware": "b",
                     "transport": {"kind": "udp", "host": "127.0.0.1", "port": 9}}],
    }, tmp_path / "g.yaml")
    server = Server()
    gw = Gateway(cfg, source=server)
    try:
        offer = Offer(device_id="d0", source="local", artifact_id="a2", version=Version(2, 0, 0),
                      report_to={"file": "app-2.0.0.bin"})
        server.plan = ["down"]
        await gw.final(offer, Outcome("d0", Status.FAILED, UpdateResult.CONNECTION_LOST, "A"))
        server.plan = ["lost-answer"]
        gw._report_due.clear()  # its retry is due (a restarted gateway retries at once)
        await gw.flush_unreported(cfg.devices[0])
        server.plan = []
        await gw.final(offer, Outcome("d0", Status.UPDATED, UpdateResult.SUCCESS, "B"))
    finally:
        gw.close()
    by_id: dict[Any, set[str]] = {}
    for r in server.took:
        by_id.setdefault(r.report_id, set()).add(r.detail)
    assert all(len(details) == 1 for details in by_id.values()), by_id
    # A again under its own id (its first answer was lost), then B under a new one: last word B
    assert [r.detail for r in server.took] == ["failed: A", "failed: A", "updated: B"], server.took
    assert len(by_id) == 2 and server.took[0].report_id == server.took[1].report_id


def test_only_a_report_never_offered_is_replaced(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.sqlite")
    try:
        h = {"device_id": "d0", "source": "local", "artifact_id": "a2"}
        a = j.queue_report("d0", h, int(UpdateResult.CONNECTION_LOST), "failed: A")
        b = j.queue_report("d0", h, int(UpdateResult.UPDATE_FAILED), "failed: B")
        assert b.id == a.id and [r.detail for r in j.unreported("d0")] == ["failed: B"]
        # about to be sent (a gateway killed now leaves attempts at 0): never rewritten again
        j.report_offered(b.id)
        c = j.queue_report("d0", h, int(UpdateResult.SUCCESS), "updated: C")
        assert c.id != b.id
        assert [(r.detail, r.offered) for r in j.unreported("d0")] == [
            ("failed: B", True), ("updated: C", False)]
        # another offer's report is its own row
        d = j.queue_report("d0", {**h, "artifact_id": "a3"}, 1, "updated: D")
        assert d.id not in (b.id, c.id)
    finally:
        j.close()


def test_a_journal_of_an_older_gateway_counts_tried_reports_as_offered(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE reports (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT, "
               "handle TEXT, result INTEGER, detail TEXT, state TEXT, attempts INTEGER DEFAULT 0, "
               "last_error TEXT, created_at REAL, done_at REAL)")
    db.execute("INSERT INTO reports (device_id, handle, result, detail, state, attempts) VALUES "
               "('d0', '{}', 4, 'failed: A', 'pending', 1), ('d1', '{}', 4, 'failed: X', 'pending', 0)")
    db.commit()
    db.close()
    j = Journal(path)
    try:
        assert [r.offered for r in j.unreported()] == [True, False]
        assert j.queue_report("d0", {}, 1, "updated: B").id != 1
        assert j.queue_report("d1", {}, 1, "updated: Y").id == 2
    finally:
        j.close()


async def test_hawkbit_action_closed_by_a_report_whose_answer_was_lost(tmp_path: Path) -> None:
    """hawkBit closes the action with A's feedback (answer lost); A sent again and the later B
    are refused with hawkBit's reason (410 Gone, action closed): neither pending nor lost, and
    the server holds exactly one closing feedback."""
    key = devkit.make_key(tmp_path / "k.pem")
    hb = HawkbitServer(final_faults=["drop"])
    act = hb.deploy("d0", b"\0" * 64, "2.0.0")
    async with serve(hb.app()) as base:
        cfg = parse_config({
            "state_dir": str(tmp_path / "state"), "trusted_keys": [str(key)],
            "source": {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                       "request_timeout_s": 5},
            "devices": [{"id": "d0", "hardware": "b",
                         "transport": {"kind": "udp", "host": "127.0.0.1", "port": 9}}],
        }, tmp_path / "g.yaml")
        gw = Gateway(cfg)
        try:
            offer = Offer(device_id="d0", source="hawkbit", artifact_id="a2",
                          version=Version(2, 0, 0),
                          report_to={"controller": "d0", "action_id": str(act.id)})
            await gw.final(offer, Outcome("d0", Status.FAILED, UpdateResult.CONNECTION_LOST, "A"))
            (a,) = gw.journal.unreported()
            assert a.offered and a.attempts == 1
            await gw.final(offer, Outcome("d0", Status.UPDATED, UpdateResult.SUCCESS, "B"))
            reps = gw.journal.reports("d0")
            assert [(r.detail, r.state) for r in reps] == [("failed: A", "refused"),
                                                           ("updated: B", "refused")]
            assert "410" in (reps[0].last_error or "") and "closed" in (reps[1].last_error or "")
            assert len({r.id for r in reps}) == 2
        finally:
            await gw.source.close()
            gw.close()
    assert [f["status"]["result"]["finished"] for f in act.finals()] == ["failure"]
