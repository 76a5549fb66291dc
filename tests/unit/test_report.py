"""The run report's pictures and the report command line (side-by-side comparison, bad input)."""

from __future__ import annotations

import json

import pytest

from pl_parablock.recipe.load import load_recipe
from pl_parablock.report import build_report, format_comparison, format_summary, main, write_pictures, write_report
from pl_parablock.wire.link import Link

PNG = b"\x89PNG\r\n\x1a\n"


def fake_server(mode: str, clients: int = 2, rounds: int = 6, compute: float = 0.3, comm: float = 0.3) -> dict:
    """What an aggregator reports after a run, with timings laid out as the mode would lay them out."""
    t0 = 1000.0
    client_reports = {}
    closed = {}
    for cid in range(clients):
        recs, start = [], t0 + 1.0
        for r in range(rounds):
            end = start + compute
            sent = end
            arrived = sent + comm
            rec = {
                "round": r,
                "block": r % 4,
                "started_at": start,
                "ended_at": end,
                "sent_at": sent,
                "arrived_at": arrived,
                "applied_at": arrived if mode == "sync" else max(arrived, end + compute),
                "compute_s": compute,
                "upload_s": comm / 2,
                "server_wait_s": 0.02,
                "download_s": comm / 2 - 0.02,
                "blocked_s": comm if mode == "sync" else 0.01,
                "bytes_up": 1_000_000,
                "bytes_down": 1_000_000,
                "loss": 3.0 - 0.1 * r,
                "samples": 40,
                "weight": 40.0,
                "kind": "value",
                "version": r,
            }
            recs.append(rec)
            closed[r] = max(closed.get(r, 0.0), arrived - t0)
            start = arrived if mode == "sync" else end
        client_reports[str(cid)] = {"rounds": recs, "final": {"eval_loss": 2.5, "exact_match": 0.1, "eval_curve": []}}
    rounds_rec = [
        {
            "round": r,
            "block": r % 4,
            "expected": clients,
            "arrived": clients,
            "rejected": 0,
            "late": 0,
            "aggregation_s": 0.001,
            "closed_at": closed[r],
            "loss": 3.0 - 0.1 * r,
        }
        for r in range(rounds)
    ]
    return {
        "mode": mode,
        "clients": clients,
        "rounds_planned": rounds,
        "schedule": [r % 4 for r in range(rounds)],
        "blocks": [{"name": f"layers.{i}", "params": []} for i in range(4)],
        "server_lr": 1.0,
        "rounds": rounds_rec,
        "client_reports": client_reports,
        "started_at": t0,
    }


def make_run(tmp_path, name: str, mode: str) -> tuple[str, dict]:
    out = tmp_path / name
    recipe = load_recipe(None, [f"mode={mode}", f"output_dir={out}"])
    link = Link(uplink_mbps=16, downlink_mbps=32, latency_ms=20)
    report = build_report(recipe, fake_server(mode), wall_s=9.0, link=link, output_dir=str(out))
    report["pictures"] = write_pictures(report, str(out))
    write_report(report, str(out))
    return str(out), report


def test_pictures_are_written_next_to_the_report(tmp_path):
    _, report = make_run(tmp_path, "run", "parablock")
    assert set(report["pictures"]) == {"timeline", "loss"}
    for path in report["pictures"].values():
        with open(path, "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG) and len(data) > 10_000
    assert report["train_wall_s"] == pytest.approx(0.3 * 6 + 0.3, abs=1e-6)
    assert "pictures" in format_summary(report) and "training" in format_summary(report)


def test_compare_two_runs_prints_a_table_and_writes_a_picture(tmp_path, capsys):
    a, _ = make_run(tmp_path, "sync", "sync")
    b, _ = make_run(tmp_path, "para", "parablock")
    picture = tmp_path / "cmp" / "both.png"
    assert main([a, b, "-o", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "sync" in out and "parablock" in out and "B / A" in out and "training time" in out
    assert picture.read_bytes().startswith(PNG)


def test_one_run_shows_its_table_and_redraws_its_pictures(tmp_path, capsys):
    run, report = make_run(tmp_path, "run", "sync")
    for path in report["pictures"].values():
        (tmp_path / "run" / path.rsplit("/", 1)[-1]).unlink()
    assert main([run + "/report.json"]) == 0
    assert "comm hidden" in capsys.readouterr().out
    assert (tmp_path / "run" / "timeline.png").exists() and (tmp_path / "run" / "loss.png").exists()


def test_the_table_puts_numbers_side_by_side():
    a = {"mode": "sync", "wall_s": 10.0, "train_wall_s": 8.0, "totals": {"comm_s": 4.0}, "link": {"description": "no link emulation"}}
    b = {"mode": "parablock", "wall_s": 5.0, "train_wall_s": 4.0, "totals": {"comm_s": 4.0}, "link": {"description": "no link emulation"}}
    table = format_comparison(a, b, "a", "b")
    wall = next(line for line in table.splitlines() if "wall time" in line)
    assert wall.split()[-3:] == ["10.0", "5.0", "0.500"]
    assert "n/a" in table  # missing values are shown, not crashed on


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: str(p / "missing"), "no such file or directory"),
        (lambda p: str(p), "holds no report.json"),
        (lambda p: (p / "report.json").write_text("{not json") and str(p), "is not a run report"),
        (lambda p: (p / "report.json").write_text(json.dumps({"mode": "sync"})) and str(p), "lacks"),
    ],
    ids=["missing-dir", "not-a-run", "bad-json", "not-a-report"],
)
def test_bad_input_is_one_clear_message_and_status_2(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main([path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_more_than_two_runs_is_refused(tmp_path, capsys):
    a, _ = make_run(tmp_path, "a", "sync")
    assert main([a, a, a]) == 2
    assert "not 3" in capsys.readouterr().err


def test_the_eval_curve_is_drawn_with_the_training_loss(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pl_parablock.report import _draw_losses

    _, report = make_run(tmp_path, "run", "parablock")
    report["eval_curve"] = [{"round": 2, "eval_loss": 2.9}, {"round": 5, "eval_loss": 2.6}]
    fig = Figure()
    ax_time, ax_round = fig.subplots(1, 2)
    _draw_losses(ax_time, ax_round, [("parablock", report)])
    eval_lines = [ln for ln in ax_round.get_lines() if "eval loss" in str(ln.get_label())]
    assert len(eval_lines) == 1
    assert list(eval_lines[0].get_xdata()) == [2, 5] and list(eval_lines[0].get_ydata()) == [2.9, 2.6]
    assert "eval loss of the global model" in [t.get_text() for t in ax_round.get_legend().get_texts()][-1]
