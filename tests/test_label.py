"""`prefcli label` driven through a pseudo-terminal (pexpect): answers, tie, skip, undo, Ctrl-C, resume;
and the append-only store's crash recovery."""

import json
import os
import signal
import sys

import pexpect
import pytest

from prefcli.errors import DataError
from prefcli.label.terminal import Item, Store, item_id, pair_row, read_items, shown_order

from .conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", OMP_NUM_THREADS="1", PREFCLI_RATER="ann")
KEYS = r"\[q\] quit"  # the last line of each screen: the item is drawn, keys are read


def pairs_file(tmp_path, n=4):
    p = tmp_path / "cands.jsonl"
    p.write_text(
        "".join(
            json.dumps({"prompt": f"Prompt number {i}", "completions": [f"alpha {i}", f"beta {i}"]}) + "\n"
            for i in range(1, n + 1)
        )
    )
    return p


def spawn(*args, cwd):
    c = pexpect.spawn(
        sys.executable,
        ["-m", "prefcli", "label", *[str(a) for a in args]],
        env=ENV,
        cwd=str(cwd),
        encoding="utf-8",
        timeout=180,  # generous: a loaded CI machine starts python slowly
        dimensions=(50, 120),
        preexec_fn=_default_sigint,
    )
    return c


def _default_sigint():
    """In the child, before exec: Ctrl-C delivered and not ignored, whatever the test process inherited or
    an earlier test left behind (a blocked mask and an ignored signal both survive exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def answer(c, shown: str, key: str):
    c.expect(shown)
    c.expect(KEYS)
    c.send(key)


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_label_pairs_undo_ctrl_c_and_resume(tmp_path):
    src = pairs_file(tmp_path)
    out = tmp_path / "prefs.jsonl"
    c = spawn(src, "--out", out, "--no-shuffle", cwd=tmp_path)
    answer(c, "Prompt number 1", "a")
    answer(c, "Prompt number 2", "t")  # a tie: journal only
    answer(c, "Prompt number 3", "b")
    answer(c, "Prompt number 4", "u")  # undo: item 3 comes back, its row leaves the file
    answer(c, "Prompt number 3", "a")
    c.expect("Prompt number 4")
    c.expect(KEYS)
    c.sendintr()  # Ctrl-C
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 130
    assert rows(out) == [  # who chose, and where the chosen completion was shown (position bias)
        {
            "prompt": "Prompt number 1",
            "chosen": "alpha 1",
            "rejected": "beta 1",
            "chosen_position": "A",
            "rater": "ann",
        },
        {
            "prompt": "Prompt number 3",
            "chosen": "alpha 3",
            "rejected": "beta 3",
            "chosen_position": "A",
            "rater": "ann",
        },
    ]
    journal = rows(tmp_path / "prefs.log.jsonl")
    assert [e["action"] for e in journal] == ["open", "answer", "answer", "answer", "undo", "answer"]
    assert journal[2]["answer"] == "tie" and journal[2]["out_offset"] is None
    # resume: items 1-3 are done; undo reaches back into the previous session (item 3), then all is answered
    c = spawn(src, "--out", out, "--no-shuffle", "--rater", "bob", cwd=tmp_path)
    answer(c, "Prompt number 4", "u")
    answer(c, "Prompt number 3", "b")
    answer(c, "Prompt number 4", "s")  # skip: journal only
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    summary = json.loads(c.before.strip().splitlines()[-1])
    assert summary["status"] == "completed" and (
        summary["answered"],
        summary["rows"],
        summary["ties"],
        summary["skips"],
    ) == (4, 2, 1, 1)
    assert rows(out)[1] == {
        "prompt": "Prompt number 3",
        "chosen": "beta 3",
        "rejected": "alpha 3",
        "chosen_position": "B",
        "rater": "bob",
    }
    assert summary["rater"] == "bob"
    # what `prefcli reward`/`contrastive` read: prompt/chosen/rejected rows, with the rater and position beside
    from prefcli.engine.data import load_rows
    from prefcli.recipe.sections import DataSource

    ds = load_rows(DataSource(path=str(out)), required=["prompt", "chosen", "rejected"])
    assert len(ds) == 2 and ds.column_names == ["prompt", "chosen", "rejected", "chosen_position", "rater"]


@pytest.mark.slow
def test_label_ratings_feed_the_human_scores_reward(tmp_path):
    src = tmp_path / "gen.jsonl"  # what `prefcli generate` writes
    src.write_text(
        "".join(json.dumps({"index": i, "prompt": "And the", "completion": f"text {i}"}) + "\n" for i in range(3))
    )
    out = tmp_path / "scores.jsonl"
    c = spawn(src, "--out", out, "--scale", "5", cwd=tmp_path)
    c.expect("text 0")
    c.expect(KEYS)
    c.send("9")  # out of the scale: ignored
    c.send("4")
    answer(c, "text 1", "s")
    answer(c, "text 2", "q")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert json.loads(c.before.strip().splitlines()[-1])["status"] == "stopped"
    assert rows(out) == [{"prompt": "And the", "completion": "text 0", "score": 4, "rater": "ann"}]
    from pydantic import TypeAdapter

    from prefcli.recipe.reward_specs import RewardSpec
    from prefcli.reward_sources import build_rewards

    rs = build_rewards([TypeAdapter(RewardSpec).validate_python({"kind": "human_scores", "path": str(out)})])
    assert rs.score(["And the"], ["text 0"])[0] == [4.0]


def test_store_recovers_from_a_crash_between_the_two_writes(tmp_path):
    out, log = tmp_path / "o.jsonl", tmp_path / "o.log.jsonl"
    s = Store.open(out, log)
    it = Item("x1", "p", ["a", "b"])
    s.answer(it, "A", pair_row(it, "A", (0, 1)))
    good = out.read_text()
    with open(out, "a") as f:  # an OUT row whose journal line never landed
        f.write('{"prompt": "p2", "chosen": "c", "rejected": "d"}\n')
    s2 = Store.open(out, log)
    assert out.read_text() == good and s2.answered == {"x1"} and "asked again" in s2.notes[0]
    out.write_text("")  # edited behind the journal's back
    with pytest.raises(DataError, match="shorter"):
        Store.open(out, log)


def test_store_undo_truncates_only_its_own_row(tmp_path):
    out, log = tmp_path / "o.jsonl", tmp_path / "o.log.jsonl"
    out.write_text('{"prompt": "older", "chosen": "x", "rejected": "y"}\n')  # rows from before: kept
    s = Store.open(out, log)
    a, b = Item("1", "p1", ["a", "b"]), Item("2", "p2", ["c", "d"])
    s.answer(a, "B", pair_row(a, "B", (0, 1)))
    s.answer(b, "tie", None)
    assert s.undo()["id"] == "2" and len(rows(out)) == 2  # a tie wrote no row
    assert s.undo()["id"] == "1" and rows(out) == [{"prompt": "older", "chosen": "x", "rejected": "y"}]
    assert pair_row(a, "B", (1, 0), "r1") == {
        "prompt": "p1",
        "chosen": "a",
        "rejected": "b",
        "chosen_position": "B",
        "rater": "r1",
    }
    assert s.undo() is None
    assert Store.open(out, log).answered == set()


def test_read_items_and_order(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "p", "completion_a": "x", "completion_b": "y"}\n')
    items, mode = read_items(p, None)
    assert mode == "pair" and items[0].completions == ["x", "y"] and items[0].id == item_id("p", ["x", "y"])
    orders = {shown_order(Item(str(i), "p", ["x", "y"]), True, 0) for i in range(20)}
    assert orders == {(0, 1), (1, 0)}  # shuffled, and stable per item
    assert shown_order(items[0], True, 0) == shown_order(items[0], True, 0)
    p.write_text('{"prompt": "p", "completions": ["x", "y", "z"]}\n')
    with pytest.raises(DataError, match="c.jsonl:1: a pair needs exactly two completions, got 3"):
        read_items(p, "pair")
    assert len(read_items(p, "rate")[0]) == 3
    p.write_text('{"prompt": "p"}\n')
    with pytest.raises(DataError, match="no completions"):
        read_items(p, None)


def test_label_needs_a_terminal_and_an_out_file(tmp_path, cli):
    src = pairs_file(tmp_path)
    code, stdout, stderr = cli("label", src, "--out", tmp_path / "o.jsonl")  # CliRunner: stdin is not a TTY
    assert code == 2 and "interactive: run it in a terminal" in stderr
    code, stdout, stderr = cli("label", src)
    assert code == 2 and "--out FILE.jsonl is required" in stderr
    code, stdout, stderr = cli("label", "--out", tmp_path / "o.jsonl")
    assert code == 2 and "give an input JSONL of candidates, or --model DIR" in stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_sampled_candidates_are_cached_for_resume(tmp_path, tiny_model_dir, monkeypatch):
    from prefcli.evaluate import generation
    from prefcli.label import terminal as label

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And the\nLet there be\n")
    opts = label.LabelOptions(
        model_dir=str(tiny_model_dir),
        prompts=str(prompts),
        out=str(tmp_path / "o.jsonl"),
        settings={"max_new_tokens": 4},
    )
    first = list(label.sampled_items(opts, "pair", sys.stderr))
    assert [len(i.completions) for i in first] == [2, 2]
    assert len(rows(tmp_path / "o.candidates.jsonl")) == 2

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(generation.Generator, "generate", no_sampling)
    again = list(label.sampled_items(opts, "pair", sys.stderr))
    assert [i.id for i in again] == [i.id for i in first]


def test_keys_typed_while_sampling_never_answer_an_unseen_item(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """issue 24: with --model, keys typed while the next pair is sampled (the old pair used to stay on screen)
    were applied to the pair drawn next, which the rater had not seen. The terminal now says it is sampling, and
    drops every key typed before an item is on screen. Here the rater types 'b' during each sampling and 'a' (then
    'q') only after seeing an item: the one answer recorded is 'a' on the first item."""
    import pty
    import tty

    from prefcli.evaluate import generation
    from prefcli.evaluate.generation import Generation
    from prefcli.label import terminal as label

    master, slave = pty.openpty()
    tty.setraw(master)
    stdin = os.fdopen(slave, "r")
    monkeypatch.setattr(sys, "stdin", stdin)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And the\nLet there be\n")

    def slow_sampling(self, batch):  # the rater types while the model samples
        os.write(master, b"b")
        return [Generation(p, f"cand {i}", [], [], "length") for i, p in enumerate(batch)]

    monkeypatch.setattr(generation.Generator, "generate", slow_sampling)
    screens = iter([b"a", b"q"])
    real_discard = label.Keys.discard

    def discard_then_type(self):  # the item is on screen: now the rater types the answer they mean
        real_discard(self)
        os.write(master, next(screens))

    monkeypatch.setattr(label.Keys, "discard", discard_then_type)
    out = tmp_path / "o.jsonl"
    opts = label.LabelOptions(
        model_dir=str(tiny_model_dir), prompts=str(prompts), out=str(out), shuffle=False, settings={}
    )
    try:
        summary = label.run_label(opts)
    finally:
        stdin.close()
        os.close(master)
    assert summary["status"] == "stopped" and summary["answered"] == 1
    assert [(r["prompt"], r["chosen_position"]) for r in rows(out)] == [("And the", "A")]
    assert "sampling candidates for prompt 2" in capsys.readouterr().err
