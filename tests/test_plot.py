"""`prefcli plot`: curves of one or several runs in one PNG, headless."""

import json

from .conftest import last_json


def fake_run(path, scale=1.0, n=20):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, n + 1):
            f.write(
                json.dumps(
                    {
                        "step": s,
                        "loss/sft": scale * 5 / s,
                        "lr": 1e-3,
                        "reward/mean": s * 0.1 * scale,
                        "kl/mean": 0.01 * s,
                        "perf/tokens_per_s": 1000.0,
                    }
                )
                + "\n"
            )
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "eval/loss": scale * 4 / s, "eval/ppl": 2.0}) + "\n")
        f.write('{"step": 21, "loss/sft": 0.2')  # a line cut by a crash is skipped
    return path


def test_plot_several_runs_in_one_png(tmp_path, cli):
    a, b = fake_run(tmp_path / "x" / "run"), fake_run(tmp_path / "y" / "run", scale=2.0)
    out = tmp_path / "both.png"
    code, stdout, stderr = cli("plot", a, b, "-o", out, "--metric", "loss", "--metric", "reward", "--title", "t")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["metrics"] == ["loss/sft", "reward/mean"] and s["runs"] == ["run", "run (2)"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_one_run_defaults_to_its_folder(tmp_path, cli):
    a = fake_run(tmp_path / "r")
    code, stdout, stderr = cli("plot", a)
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["output"] == str(a / "curves.png") and (a / "curves.png").stat().st_size > 5000
    assert "perf/tokens_per_s" not in s["metrics"] and s["metrics"][0] == "loss/sft" and "eval/loss" in s["metrics"]


def test_plot_bad_input_exits_2(tmp_path, cli):
    a = fake_run(tmp_path / "r")
    code, stdout, stderr = cli("plot", a, "--metric", "los")
    assert code == 2 and "no metric 'los' in these runs (available: eval/loss" in stderr
    assert last_json(stdout)["status"] == "invalid"
    code, stdout, stderr = cli("plot", tmp_path / "nothing")
    assert code == 2 and "no metrics.jsonl" in stderr
    assert not (tmp_path / "nothing").exists() and not (a / "curves.png").exists()


def test_each_run_keeps_its_colour_in_every_panel_and_one_legend_names_them(tmp_path):
    """A run missing from a panel used to shift the colour cycle there (and the legend sat on the first panel
    only), so compared runs were mislabelled."""
    import matplotlib.pyplot as plt

    from prefcli.engine.plots import figure, read_metrics

    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", scale=2.0)
    only_loss = tmp_path / "c"
    only_loss.mkdir()
    (only_loss / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/sft": 1 / s}) + "\n" for s in (1, 2)))
    runs = {"c": read_metrics(only_loss / "metrics.jsonl"), "a": read_metrics(a / "metrics.jsonl")}
    runs["b"] = read_metrics(b / "metrics.jsonl")
    fig = figure(runs, ["loss/sft", "reward/mean", "eval/loss"], title="t")
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"a", "b", "c"} and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == 3  # three runs, three colours
    assert [ax.get_legend() for ax in fig.axes] == [None] * len(fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["c", "a", "b"]
    assert [h.get_color() for h in legend.legend_handles] == [next(iter(colours[k])) for k in ("c", "a", "b")]
    plt.close(fig)
