"""`prefcli label serve` in this process (Starlette's TestClient over the real app and store): assignment with
overlap and gold items, undo and idempotent retries, leases that lapse, security (escaping, CSRF, tokens,
what a rater can read), malformed posts, and the commands around it (invite, stats, export, import)."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

pytest.importorskip("starlette", reason="pip install 'prefcli[label]'")
pytest.importorskip("krippendorff", reason="pip install 'prefcli[label]'")

from .label_tasks import bearer, make_task, served  # noqa: E402

XSS = ["<script>document.title", "<img src=x onerror", '<b onmouseover="alert(1)">']


def answer_all(client, token, pick=lambda item: "A", limit=100) -> list[dict]:
    """Answer every item the server hands this rater; the /api/next bodies seen."""
    seen = []
    for _ in range(limit):
        r = client.get("/api/next", headers=bearer(token)).json()
        if r.get("done") or r.get("wait"):
            seen.append(r)
            return seen
        seen.append(r)
        a = client.post(
            "/api/answer",
            headers=bearer(token),
            json={"assignment": r["assignment"], "answer": pick(r["item"]), "client_id": f"c-{r['assignment']:06d}"},
        )
        assert a.status_code == 200, a.text
    raise AssertionError("never done")


def answer_in_turns(client, picks: dict) -> None:
    """Raters (token -> pick) answer one item each in turn until nobody gets one."""
    active = dict(picks)
    while active:
        for token, pick in list(active.items()):
            r = client.get("/api/next", headers=bearer(token)).json()
            if r.get("done") or r.get("wait"):
                del active[token]
                continue
            a = client.post(
                "/api/answer", headers=bearer(token), json={"assignment": r["assignment"], "answer": pick(r["item"])}
            )
            assert a.status_code == 200, a.text


def db_rows(store, sql, *args):
    return store.db.execute(sql, args).fetchall()


def test_overlap_gold_and_no_item_twice(tmp_path):
    with served(make_task(tmp_path)) as (store, desk, client):
        tokens = {n: store.invite(n)[0] for n in ("ann", "bob", "cy")}
        for n in ("ann", "bob", "cy"):
            answer_all(client, tokens[n])
        live = db_rows(store, "SELECT item_id, rater_id FROM answers WHERE undone_at IS NULL")
        assert len(live) == len(set(live)), "an item answered twice by one rater"
        per_item = {}
        for item, _ in live:
            per_item[item] = per_item.get(item, 0) + 1
        gold_ids = {i for (i,) in db_rows(store, "SELECT id FROM items WHERE gold IS NOT NULL")}
        real = {i: n for i, n in per_item.items() if i not in gold_ids}
        assert len(real) == 13 and set(real.values()) == {2}, real  # every item reached its overlap, no more
        assert desk.complete() and desk.overall()["items_complete"] == 13
        assert any(i in gold_ids for i in per_item), "no gold item was mixed in"
        nxt = client.get("/api/next", headers=bearer(tokens["cy"])).json()
        assert nxt["done"] and nxt["reason"] == "complete"


def test_items_are_completed_before_new_ones_start(tmp_path):
    """With overlap 2, the second rater is handed the items the first one answered (the fullest first), so items
    complete one after another instead of all being half done."""
    with served(make_task(tmp_path, gold=None)) as (store, desk, client):
        ann, bob = store.invite("ann")[0], store.invite("bob")[0]
        for _ in range(3):
            r = client.get("/api/next", headers=bearer(ann)).json()
            client.post("/api/answer", headers=bearer(ann), json={"assignment": r["assignment"], "answer": "A"})
        r = client.get("/api/next", headers=bearer(bob)).json()
        answered_by_ann = {
            p for (p,) in db_rows(store, "SELECT i.prompt FROM answers a JOIN items i ON i.id = a.item_id")
        }
        assert r["item"]["prompt"] in answered_by_ann
        assert desk.overall()["items_complete"] == 0


def test_reload_shows_the_same_item_and_undo_brings_it_back(tmp_path):
    with served(make_task(tmp_path, gold=None, shuffle=False)) as (store, desk, client):
        t = store.invite("ann")[0]
        first = client.get("/api/next", headers=bearer(t)).json()
        again = client.get("/api/next", headers=bearer(t)).json()
        assert again["assignment"] == first["assignment"]  # a reload: the same item, never a second one
        body = {"assignment": first["assignment"], "answer": "B", "client_id": "retry-me-1"}
        r1 = client.post("/api/answer", headers=bearer(t), json=body).json()
        r2 = client.post("/api/answer", headers=bearer(t), json=body).json()  # the network retried it
        assert (r1["duplicate"], r2["duplicate"]) == (False, True)
        assert db_rows(store, "SELECT COUNT(*) FROM answers")[0][0] == 1
        second = client.get("/api/next", headers=bearer(t)).json()
        assert second["assignment"] != first["assignment"]
        u1 = client.post("/api/undo", headers=bearer(t), json={"client_id": "undo-once-1"}).json()
        u2 = client.post("/api/undo", headers=bearer(t), json={"client_id": "undo-once-1"}).json()
        assert u1 == {"ok": True, "duplicate": False, "assignment": first["assignment"]} and u2["duplicate"]
        assert db_rows(store, "SELECT COUNT(*) FROM answers WHERE undone_at IS NULL")[0][0] == 0
        back = client.get("/api/next", headers=bearer(t)).json()
        assert back["assignment"] == first["assignment"] and back["item"] == first["item"]
        client.post("/api/answer", headers=bearer(t), json={"assignment": back["assignment"], "answer": "A"})
        assert client.get("/api/next", headers=bearer(t)).json()["assignment"] == second["assignment"]
        r = client.post("/api/answer", headers=bearer(t), json={"assignment": first["assignment"], "answer": "A"})
        assert r.status_code == 409 and "already answered" in r.json()["error"]
        assert client.post("/api/undo", headers=bearer(t), json={}).status_code == 200
        assert client.post("/api/undo", headers=bearer(t), json={}).status_code == 409  # nothing left to undo


def test_a_lapsed_lease_goes_to_another_rater(tmp_path):
    now = [1000.0]
    task = make_task(tmp_path, gold=None, overlap=1, assignment_timeout_s=60)
    with served(task, clock=lambda: now[0]) as (store, desk, client):
        ann, bob = store.invite("ann")[0], store.invite("bob")[0]
        a = client.get("/api/next", headers=bearer(ann)).json()
        b = client.get("/api/next", headers=bearer(bob)).json()
        assert a["item"]["prompt"] != b["item"]["prompt"]  # held by ann: bob gets another item
        client.post("/api/answer", headers=bearer(bob), json={"assignment": b["assignment"], "answer": "A"})
        now[0] += 61  # ann left
        b2 = client.get("/api/next", headers=bearer(bob)).json()
        assert b2["item"]["prompt"] == a["item"]["prompt"]  # her item is reassigned
        client.post("/api/answer", headers=bearer(bob), json={"assignment": b2["assignment"], "answer": "B"})
        late = client.post("/api/answer", headers=bearer(ann), json={"assignment": a["assignment"], "answer": "A"})
        assert late.status_code == 409 and "another rater" in late.json()["error"]
        assert db_rows(store, "SELECT COUNT(*) FROM answers")[0][0] == 2
        # ann comes back: a fresh item, not the one that went to bob
        assert client.get("/api/next", headers=bearer(ann)).json()["item"]["prompt"] != a["item"]["prompt"]


def test_quota(tmp_path):
    with served(make_task(tmp_path, gold=None, quota=2)) as (store, desk, client):
        seen = answer_all(client, store.invite("ann")[0])
        assert len(seen) == 3 and seen[-1]["reason"] == "quota"


def test_the_rater_page_escapes_every_text_and_guards_its_forms(tmp_path):
    with served(make_task(tmp_path, gold=None, overlap=1, shuffle=False)) as (store, desk, client):
        token = store.invite("ann")[0]
        r = client.get(f"/r/{token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/label"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        client.cookies.set("prefcli_rater", r.cookies["prefcli_rater"])
        pages = []
        for _ in range(13):
            page = client.get("/label")
            assert page.status_code == 200
            assert "script-src 'self'" in page.headers["content-security-policy"]
            pages.append(page.text)
            for raw in XSS:
                assert raw not in page.text, raw
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            aid = re.search(r'name="assignment" value="(\d+)"', page.text).group(1)
            bad = client.post("/answer", data={"assignment": aid, "answer": "A"}, follow_redirects=False)
            assert bad.status_code == 403  # no CSRF token
            bad = client.post(
                "/answer", data={"assignment": aid, "answer": "A", "csrf": "x" * 32}, follow_redirects=False
            )
            assert bad.status_code == 403
            bad = client.post("/api/answer", json={"assignment": int(aid), "answer": "A"})
            assert bad.status_code == 403  # the JSON API with a cookie needs the X-CSRF-Token header
            ok = client.post("/answer", data={"assignment": aid, "answer": "A", "csrf": csrf}, follow_redirects=False)
            assert ok.status_code == 303
        shown = "\n".join(pages)
        assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in shown  # the payload, as text
        assert "&lt;img src=x onerror=&#34;document.title=&#39;pwned&#39;&#34;&gt;" in shown
        assert "&lt;b&gt;Raw HTML is shown as text&lt;/b&gt;" in shown and 'href="javascript:' not in shown
        assert db_rows(store, "SELECT COUNT(*) FROM answers")[0][0] == 13


def test_tokens_and_what_a_rater_can_read(tmp_path):
    with served(make_task(tmp_path)) as (store, desk, client):
        ann, bob = store.invite("ann")[0], store.invite("bob")[0]
        owner = store.owner_token()
        a = client.get("/api/next", headers=bearer(ann)).json()
        assert set(a) == {"done", "assignment", "mode", "scale", "item", "progress"}
        assert set(a["item"]) == {"prompt", "candidates", "labels"}  # no gold flag, no answers, no other raters
        theirs = client.post("/api/answer", headers=bearer(bob), json={"assignment": a["assignment"], "answer": "A"})
        assert theirs.status_code == 404  # another rater's assignment: refused, as if it did not exist
        for path in ("/api/stats", "/dashboard"):
            assert client.get(path, headers=bearer(ann)).status_code == 401
        assert client.get("/api/stats", headers=bearer(owner)).status_code == 200
        assert client.get("/api/next", headers=bearer(owner)).status_code == 401  # the owner token is not a rater's
        # no endpoint of a rater carries gold answers or others' answers
        for path in ("/api/next", "/api/progress", "/label", "/instructions"):
            text = client.get(path, headers=bearer(ann)).text
            assert '"gold"' not in text and "bob" not in text, path
        assert client.get(f"/r/{'x' * 32}").status_code == 404
        old = ann
        store.invite("ann")  # a new link: the old one stops working
        assert client.get("/api/next", headers=bearer(old)).status_code == 401
        codes = [client.get("/api/next", headers=bearer(f"guess{i:04d}" * 4)).status_code for i in range(25)]
        assert codes[:15] == [401] * 15 and codes[-1] == 429  # guessing is rate-limited per address
        assert client.get(f"/r/{bob}").status_code == 429  # ... even with a valid token, for a while
        assert "too many" in client.get("/api/stats", headers=bearer(owner)).json()["error"]


def test_malformed_posts_are_refused_and_the_server_keeps_serving(tmp_path, caplog):
    with served(make_task(tmp_path)) as (store, desk, client):
        t = store.invite("ann")[0]
        a = client.get("/api/next", headers=bearer(t)).json()
        h = bearer(t)
        cases = [
            client.post("/api/answer", headers=h, content=b"{not json"),
            client.post("/api/answer", headers=h, json=[1, 2]),
            client.post("/api/answer", headers=h, json={"assignment": "one", "answer": "A"}),
            client.post("/api/answer", headers=h, json={"assignment": a["assignment"], "answer": "C"}),
            client.post("/api/answer", headers=h, json={"assignment": a["assignment"], "answer": "A", "client_id": 5}),
            client.post(
                "/answer",
                headers={**h, "content-type": "multipart/form-data; boundary=zz"},
                content=b"--zz\r\nContent-Disposition: form-data; name=\r\n\r\nx\r\n--zz",
            ),
        ]
        assert [r.status_code for r in cases] == [400] * 6, [r.text for r in cases]
        big = client.post("/api/answer", headers=h, content=b"x" * 70000)
        assert big.status_code == 413
        assert "400 POST /api/answer" in caplog.text and "answer: expected A, B, tie or skip" in caplog.text
        ok = client.post("/api/answer", headers=h, json={"assignment": a["assignment"], "answer": "tie"})
        assert ok.status_code == 200 and ok.json()["ok"]


def test_rate_and_rank_modes(tmp_path):
    rows = [{"prompt": f"p{i}", "completions": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(3)]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rank = make_task(tmp_path / "rank", gold=None, mode="rank", items={"path": str(items)}, shuffle=False)
    with served(rank) as (store, desk, client):
        t = store.invite("ann")[0]
        n = client.get("/api/next", headers=bearer(t)).json()
        assert n["item"]["labels"] == ["1", "2", "3"]
        for wrong in ([1, 1, 2], [1, 1], [1, 4], "9 1", [], "first"):
            bad = client.post("/api/answer", headers=bearer(t), json={"assignment": n["assignment"], "answer": wrong})
            assert bad.status_code == 400, wrong
        client.post("/api/answer", headers=bearer(t), json={"assignment": n["assignment"], "answer": "3 1"})
        assert json.loads(db_rows(store, "SELECT choice FROM answers")[0][0]) == [2, 0, 1]  # the last place follows
    rate = make_task(tmp_path / "rate", gold=None, mode="rate", scale=3, items={"path": str(items)})
    with served(rate) as (store, desk, client):
        t = store.invite("ann")[0]
        assert desk.overall()["items"] == 9  # each completion is an item to rate
        n = client.get("/api/next", headers=bearer(t)).json()
        assert len(n["item"]["candidates"]) == 1
        r = client.post("/api/answer", headers=bearer(t), json={"assignment": n["assignment"], "answer": 4})
        assert r.status_code == 400 and "from 1 to 3" in r.json()["error"]
        client.post("/api/answer", headers=bearer(t), json={"assignment": n["assignment"], "answer": "3"})


# ------------------------------------------------------------------------------------ the commands


def test_invite_stats_export_and_data_inspect_agree(tmp_path, cli):
    """Three raters answer by different rules; `label stats` and `data inspect` on the export give the same
    agreement, and the export is what `reward` reads."""
    task = make_task(tmp_path)
    code, out, err = cli("label", "invite", task, "--rater", "ann")
    assert code == 0 and json.loads(out)["link"].startswith("http://127.0.0.1:8765/r/")
    picks = {
        "ann": lambda item: "A" if "saith the LORD" in item["candidates"][0] else "B",  # right
        "bob": lambda item: "A",  # always A
        "cy": lambda item: (
            "tie" if len(item["prompt"]) % 3 == 0 else ("B" if "saith" in item["candidates"][1] else "A")
        ),
    }
    with served(task) as (store, desk, client):
        answer_in_turns(client, {store.invite(name)[0]: pick for name, pick in picks.items()})
    code, out, err = cli("label", "stats", task)
    assert code == 0, err
    s = json.loads(out)
    assert s["complete"] and s["answers"] == 26 and s["raters"] == 3
    flagged = {f["rater"] for f in s["flagged"]}
    assert "bob" in flagged  # always A: position bias (and low gold accuracy when it got gold items)
    code, out, err = cli("label", "export", task, "-o", tmp_path / "prefs.jsonl")
    assert code == 0, err
    summary = json.loads(out)
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(rows) == 26 - summary["left_out"]["ties"] - summary["left_out"]["skips"]
    assert set(rows[0]) == {
        "prompt", "chosen", "rejected", "chosen_position", "rater", "item", "shown_at", "answered_at", "time_s"
    }  # fmt: skip
    code, out, err = cli("data", "inspect", tmp_path / "prefs.jsonl")
    assert code == 0, err
    inspect = json.loads(out)["raters"]
    assert inspect["krippendorff_alpha"] == pytest.approx(s["agreement"]["krippendorff_alpha"], abs=1e-9)
    mine = {tuple(p["raters"]): p["kappa"] for p in s["agreement"]["cohen_kappa"]}
    theirs = {tuple(p["raters"]): p["kappa"] for p in inspect["cohen_kappa"]}
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert (mine[k] is None and theirs[k] != theirs[k]) or mine[k] == pytest.approx(theirs[k], abs=1e-9), k
    per = {r["rater"]: r for r in s["per_rater"]}
    for r in inspect["per_rater"]:  # position bias over the exported (real, decisive) answers of each rater
        exported = [x for x in rows if x["rater"] == r["rater"]]
        assert r["chosen_shown_first"] == pytest.approx(
            sum(x["chosen_position"] == "A" for x in exported) / len(exported)
        )
    assert per["bob"]["chosen_shown_first"] == 1.0
    code, out, err = cli("label", "export", task, "--all", "-o", tmp_path / "all.jsonl")
    assert json.loads(out)["rows"] == 26 + s["gold_answers"]


def test_import_from_the_terminal_tool(tmp_path, cli):
    """The terminal tool's files (answers + journal) import into a task: pairs, a tie, items the task lacks."""
    from prefcli.label.terminal import Item, Store, item_id, pair_row

    task = make_task(tmp_path)
    rows = [json.loads(x) for x in open(task_items(task))]
    out, log = tmp_path / "t.jsonl", tmp_path / "t.log.jsonl"
    s = Store.open(out, log)
    its = [Item(item_id(r["prompt"], r["completions"]), r["prompt"], r["completions"]) for r in rows[:3]]
    s.answer(its[0], "A", pair_row(its[0], "A", (1, 0), "terry"))  # shown swapped: chose completion 1
    s.answer(its[1], "tie", None)
    extra = Item("zz", "not in the task", ["u", "v"])
    s.answer(extra, "B", pair_row(extra, "B", (0, 1), "terry"))
    code, out_, err = cli("label", "import", task, out)
    assert code == 0, err
    assert json.loads(out_) | {} == {
        "command": "label import", "status": "completed", "exit_code": 0,
        "imported": 2, "not_in_task": 1, "already_answered": 0,
    }  # fmt: skip
    code, out_, err = cli("label", "import", task, out)
    assert json.loads(out_)["already_answered"] == 2  # importing again adds nothing
    db = sqlite3.connect(tmp_path / "task.db")
    got = db.execute("SELECT answer, choice, shown, origin FROM answers ORDER BY id").fetchall()
    assert got == [('"A"', "1", "[1, 0]", "import"), ('"tie"', '"tie"', "null", "import")]


def task_items(task_path):
    import yaml

    return yaml.safe_load(task_path.read_text())["items"]["path"]


def test_serve_without_the_extra_says_what_to_install(tmp_path, cli, monkeypatch):
    import prefcli.label.serve as serve

    real = serve.find_spec
    monkeypatch.setattr(serve, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    code, out, err = cli("label", "serve", make_task(tmp_path))
    assert code == 2 and "pip install 'prefcli[label]'" in err and "missing: uvicorn" in err
    assert json.loads(out)["status"] == "invalid" and not (tmp_path / "task.db").exists()


@pytest.mark.slow
def test_the_export_of_a_served_task_trains_a_reward_model(tmp_path, cli):
    """`prefcli reward` (the tiny recipe) on the export of the tiny task, answered by two raters, runs to the end."""
    import yaml

    from .conftest import ROOT

    task = make_task(tmp_path)
    with served(task) as (store, desk, client):
        right = lambda item: "A" if "saith the LORD" in item["candidates"][0] else "B"  # noqa: E731
        answer_in_turns(client, {store.invite("ann")[0]: right, store.invite("bob")[0]: lambda item: "B"})
    code, out, err = cli("label", "export", task, "-o", tmp_path / "prefs.jsonl")
    assert code == 0 and json.loads(out)["rows"] == 26, err
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / "reward.yaml").read_text())
    recipe["model"]["tokenizer"] = str(ROOT / "data" / "tokenizer")
    recipe["data"] = {"train": {"path": str(tmp_path / "prefs.jsonl")}, "max_length": 64}
    recipe["train"].update(max_steps=4, batch_size=4, eval_every_steps=None, save_every_steps=None)
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = cli("reward", tmp_path / "reward.yaml", "-o", tmp_path / "rm", "-q")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 4, summary
    assert (tmp_path / "rm" / "final").is_dir()


def test_it_listens_on_this_machine_unless_told_and_warns_otherwise():
    from prefcli.label.serve import exposure_warning, load_task

    from .conftest import ROOT

    assert load_task(ROOT / "recipes" / "tiny" / "label-task.yaml").server.host == "127.0.0.1"
    from prefcli.recipe.commands.label import ServerSection

    assert ServerSection().host == "127.0.0.1" and exposure_warning("127.0.0.1") is None
    assert "all interfaces" in exposure_warning("0.0.0.0") and "reverse proxy" in exposure_warning("0.0.0.0")
    assert "10.0.0.5" in exposure_warning("10.0.0.5")


def test_a_model_samples_the_items_once(tmp_path, tiny_model_dir, monkeypatch):
    """items: {model, prompts}: the candidates are sampled when the store is made; later opens (invite, serve)
    take them from the store instead of sampling again."""
    from prefcli.evaluate import generation
    from prefcli.label.serve import load_task, open_store

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And the\nLet there be\nIn the beginning\n")
    import yaml

    from .label_tasks import task_dict

    d = task_dict(gold=None)
    d["items"] = {"model": str(tiny_model_dir), "prompts": str(prompts), "generation": {"max_new_tokens": 6}}
    task_path = tmp_path / "task.yaml"
    task_path.write_text(yaml.safe_dump(d))
    task = load_task(task_path)
    notes = []
    store = open_store(task_path, task, create=True, warn=notes.append)
    rows = store.db.execute("SELECT prompt, candidates, source FROM items").fetchall()
    store.close()
    assert "sampling 2 candidates for each of 3 prompts" in notes[0]
    assert {p for p, _, _ in rows} <= {"And the", "Let there be", "In the beginning"} and rows
    assert all(len(json.loads(c)) == 2 and src.startswith(str(prompts)) for _, c, src in rows)

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(generation.Generator, "generate", no_sampling)
    store = open_store(task_path, task, create=True)
    assert store.db.execute("SELECT prompt, candidates, source FROM items").fetchall() == rows
    store.close()
