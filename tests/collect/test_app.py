"""The collection app over real HTTP on loopback, on SQLite and on a real PostgreSQL: the Pick-a-Pic loop, what
the database holds after it, every refusal (and that it stores nothing), the candidate sources and the admin page."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from pickscore.collect.database import migrate, open_engine
from pickscore.collect.store import ChoiceRow, Pair, StoredImage, User
from tests.collect.conftest import Visitor

PROMPT = "two red circles on the left, blue background"


def rows(store, table) -> list:
    with Session(store.engine) as s:
        return list(s.scalars(select(table).order_by(table.__table__.primary_key.columns.values()[0])))


def counts(store) -> dict[str, int]:
    return store.counts()


@pytest.fixture
def app(start_app, db_url):
    return start_app(db=db_url, candidates="synthetic", seed=3, image_size=64)


def signed_in(app, name="ada") -> Visitor:
    visitor = Visitor(app.url)
    visitor.sign_in(name)
    assert visitor.status == 200 and visitor.error is None, visitor.error
    return visitor


# The loop ---------------------------------------------------------------------------------------------------


def test_choices_replace_the_rejected_image_and_are_stored_with_both_images(app):
    ada = signed_in(app)
    assert ada.pair is None  # no prompt yet
    ada.post("/prompt", prompt=f"  {PROMPT}  ")
    first = ada.pair
    assert first and first["image_0"] != first["image_1"]
    shown = [first]
    for label in ("left", "right", "tie", "left"):
        before = ada.pair
        ada.choose(label)
        assert ada.status == 200, ada.error
        after = ada.pair
        assert after["pair"] > before["pair"]
        if label == "left":
            assert after["image_0"] == before["image_0"] and after["image_1"] != before["image_1"]
        elif label == "right":
            assert after["image_1"] == before["image_1"] and after["image_0"] != before["image_0"]
        else:  # a tie replaces both
            assert {after["image_0"], after["image_1"]}.isdisjoint({before["image_0"], before["image_1"]})
        shown.append(after)

    choices = rows(app.store, ChoiceRow)
    assert [c.label for c in choices] == ["left", "right", "tie", "left"]
    assert [(c.label_0, c.label_1) for c in choices] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    pairs = {p.id: p for p in rows(app.store, Pair)}
    for choice, page in zip(choices, shown):
        pair = pairs[choice.pair_id]
        assert (pair.id, pair.image_0, pair.image_1) == (page["pair"], page["image_0"], page["image_1"])
        assert pair.prompt == PROMPT  # whitespace normalised
        assert pair.model_0.startswith("generator-") and pair.provenance_0["source"] == "synthetic"
        assert choice.chosen_at >= pair.shown_at
    # Images once each, under the SHA-256 of their bytes, and served as they are stored.
    images = rows(app.store, StoredImage)
    assert len(images) == len({i.id for i in images}) == len({i for p in shown for i in (p["image_0"], p["image_1"])})
    for image in images:
        assert hashlib.sha256(image.data).hexdigest() == image.id
        assert ada.opener.open(f"{app.url}/image/{image.id}").read() == image.data


def test_reloading_and_signing_in_again_show_the_same_pair(app):
    ada = signed_in(app)
    ada.post("/prompt", prompt=PROMPT)
    pair = ada.pair
    ada.get("/")
    assert ada.pair == pair
    again = signed_in(app)  # another browser, same name
    assert again.pair == pair
    again.post("/prompt", prompt="three blue stars at the top, white background")
    ada.get("/")
    assert ada.pair == again.pair != pair  # a new prompt replaces the pair everywhere


# Refusals: a clear message, the right status, nothing stored ------------------------------------------------


def test_sign_in_needs_consent_and_a_name_and_stores_nothing_without(app):
    visitor = Visitor(app.url)
    visitor.sign_in("ada", consent=False)
    assert visitor.status == 403 and "consent" in visitor.error
    visitor.sign_in("   ")
    assert visitor.status == 400 and "name: empty" in visitor.error
    visitor.sign_in("x" * 65)
    assert visitor.status == 400 and "64" in visitor.error
    assert counts(app.store)["users"] == 0
    # Without a session nothing can be posted, even with a form copied from someone else's page.
    ada = signed_in(app)
    ada.post("/prompt", prompt=PROMPT)
    stranger = Visitor(app.url)
    stranger.post("/prompt", prompt=PROMPT, csrf=ada.csrf)
    assert stranger.status == 401 and "sign in" in stranger.error
    stranger.post("/choose", **ada.pair, choice="left", csrf=ada.csrf)
    assert stranger.status == 401
    assert counts(app.store) | {"images": 0} == {"users": 1, "prompts": 1, "images": 0, "pairs_shown": 1, "choices": 0}


def test_bad_prompts_and_forged_choices_are_refused_and_store_nothing(app):
    ada = signed_in(app)
    for prompt, status, words in (
        ("", 400, "prompt: empty"),
        (" \n\t ", 400, "prompt: empty"),
        ("x" * 1001, 400, "1000"),
    ):
        ada.post("/prompt", prompt=prompt)
        assert (ada.status, words in ada.error) == (status, True), ada.error
    assert counts(app.store)["pairs_shown"] == 0
    ada.get("/")
    ada.post("/prompt", prompt=PROMPT)
    pair = ada.pair
    before = counts(app.store)

    def refused(status: int, words: str, **override) -> None:
        ada.get("/")
        ada.choose(override.pop("label", "left"), **override)
        assert ada.status == status and words in ada.error, (ada.status, ada.error)
        assert counts(app.store) == before

    refused(400, "not the images shown", image_1=hashlib.sha256(b"forged").hexdigest())
    refused(400, "not the images shown", image_0=pair["image_1"], image_1=pair["image_0"])  # sides swapped
    refused(400, "is not one of left, right, tie", label="both")
    refused(400, "not a pair id", pair="1 OR 1=1")
    refused(404, "not a pair shown to you", pair=pair["pair"] + 1000)
    refused(403, "not sent from this app's page", csrf="0" * 64)
    # Another user's pair is not yours to answer.
    bob = signed_in(app, "bob")
    bob.choose("left", **pair)
    assert bob.status == 404 and counts(app.store) == before | {"users": 2}


def test_prompts_with_control_characters_are_refused_and_whitespace_is_one_space(app):
    """Control characters (NUL, ESC, DEL, C1) and bidi embeddings, overrides and isolates are refused by code point
    and position, on SQLite as on PostgreSQL (which cannot store NUL); tabs and line breaks become spaces."""
    ada = signed_in(app)
    for prompt, named in (
        ("a red\x00 fox", "U+0000 at character 6"),
        ("\x1b[31ma red fox", "U+001B at character 1"),
        ("a red fox\x7f", "U+007F"),
        ("a red fox \x9b", "U+009B"),
        ("a fox \u202eelbuod", "U+202E at character 7"),
        ("a fox \u2066isolated\u2069", "U+2066"),
    ):
        ada.post("/prompt", prompt=prompt)
        assert ada.status == 400 and named in ada.error, (prompt, ada.status, ada.error)
        assert "\x00" not in ada.body and "\u202e" not in ada.body  # the page never echoes the character
    assert counts(app.store)["pairs_shown"] == 0
    # Whitespace of any kind is one space; joiners that emoji and scripts need stay.
    for prompt, stored in (("a red\tfox\r\nin the snow", "a red fox in the snow"), ("a coder 👩\u200d💻", None)):
        ada.post("/prompt", prompt=prompt)
        assert ada.status == 200, ada.error
        assert rows(app.store, Pair)[-1].prompt == (stored or prompt)


def test_a_replayed_or_stale_choice_is_refused(app):
    ada = signed_in(app)
    ada.post("/prompt", prompt=PROMPT)
    old = ada.pair
    ada.choose("left")
    assert ada.status == 200
    before = counts(app.store)
    ada.post("/choose", **old, choice="right")  # the back button, or a replayed request
    assert ada.status == 409 and "already chosen" in ada.error
    current = (ada.get("/"), ada.pair)[1]
    ada.post("/prompt", prompt="one green square in the center, pink background")
    ada.post("/choose", **current, choice="left")  # a pair that a new prompt replaced
    assert ada.status == 409 and "no longer shown" in ada.error
    after = counts(app.store)
    assert after["choices"] == before["choices"] == 1


def test_a_double_click_records_one_choice(app):
    """Many identical submissions at once (a double click, a impatient user): one choice, one next pair."""
    ada = signed_in(app)
    ada.post("/prompt", prompt=PROMPT)
    form = {**ada.pair, "choice": "left", "csrf": ada.csrf}
    statuses = []

    def submit():
        clone = Visitor(app.url)
        clone.opener = ada.opener  # same cookies
        clone.post("/choose", **form)
        statuses.append((clone.status, clone.error))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in statuses) == [200] + [409] * 5, statuses
    assert all("already chosen" in e or "no longer shown" in e for s, e in statuses if s == 409)
    c = counts(app.store)
    assert (c["choices"], c["pairs_shown"]) == (1, 2)


def test_invited_only_sign_in(start_app, tmp_path):
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", invited_only=True, seed=1, image_size=64)
    token = app.store.invite("for ada")
    visitor = Visitor(app.url)
    visitor.sign_in("ada")
    assert visitor.status == 401 and "invitation" in visitor.error
    visitor.sign_in("ada", invitation="made-up")
    assert visitor.status == 401 and "not a token this app issued" in visitor.error
    visitor.sign_in("ada", invitation=token)
    assert visitor.status == 200 and visitor.error is None
    other = Visitor(app.url)
    other.sign_in("mallory", invitation=token)
    assert other.status == 401 and "already in use" in other.error
    other.sign_in("ada", invitation="made-up")
    assert other.status == 401 and "wrong token" in other.error
    assert [u.name for u in rows(app.store, User)] == ["ada"]


# Sources -----------------------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def test_pool_sources_show_only_their_prompts_with_each_image_s_model(start_app, tmp_path):
    # A manifest directory and a Parquet file, given together.
    gens = tmp_path / "gens"
    gens.mkdir()
    lines = []
    for k in range(3):
        (gens / f"fox-{k}.png").write_bytes(_png((200, 10 * k, 0)))
        lines.append({"prompt": "a red fox", "image": f"fox-{k}.png", "model": f"gen-{k % 2}"})
    (gens / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = pa.table(
        {
            "prompt": ["a blue whale"] * 2 + ["a lonely owl"],
            "image": [_png((0, 0, 200)), _png((0, 40, 200)), _png((90, 90, 90))],
            "model": ["gen-a", "gen-b", "gen-a"],
        }
    )
    pq.write_table(table, tmp_path / "whales.parquet")
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", candidates=f"pool:{gens},{tmp_path / 'whales.parquet'}")
    ada = signed_in(app)
    # The pool's prompts are suggested; a prompt with a single image is left out.
    assert '<option value="a blue whale">' in ada.body and "a lonely owl" not in ada.body
    ada.post("/prompt", prompt="a purple cat")
    assert ada.status == 400 and "the pool has no images for it" in ada.error
    ada.post("/prompt", prompt="a red fox")
    fox = {hashlib.sha256((gens / f"fox-{k}.png").read_bytes()).hexdigest(): lines[k]["model"] for k in range(3)}
    seen = set()
    for _ in range(4):
        pair = ada.pair
        assert {pair["image_0"], pair["image_1"]} <= set(fox) and pair["image_0"] != pair["image_1"]
        seen |= {pair["image_0"], pair["image_1"]}
        ada.choose("left")
        assert ada.status == 200, ada.error
    assert seen == set(fox)
    for pair in rows(app.store, Pair):
        assert pair.model_0 == fox[pair.image_0] and pair.model_1 == fox[pair.image_1]
        assert pair.provenance_0["source"] == "pool" and "fox-" in pair.provenance_0["item"]
    ada.post("/prompt", prompt="a blue whale")
    assert ada.status == 200 and ada.pair is not None


def test_a_pool_of_generated_folders_as_data_synthetic_models_writes_them(start_app, tmp_path):
    """`pickscore data synthetic --models 2 --out gens`: gens/prompts.txt and gens/<model>/<prompt index>/<k>.png.
    Each image goes with the prompt on its index's line and is recorded with its folder's model."""
    from pickscore.cli import main

    gens = tmp_path / "gens"
    assert main(["data", "synthetic", "--models", "2", "--out", str(gens), "--prompts", "3"]) == 0
    prompts = (gens / "prompts.txt").read_text().splitlines()
    files = {}  # image id -> (model, prompt, path under gens)
    for path in gens.glob("*/*/*.png"):
        model, index = path.parent.parent.name, int(path.parent.name)
        files[hashlib.sha256(path.read_bytes()).hexdigest()] = (model, prompts[index], str(path.relative_to(gens)))
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", candidates=f"pool:{gens}/", seed=1)
    ada = signed_in(app)
    assert all(f'<option value="{p}">' in ada.body for p in prompts)
    for prompt in prompts:
        ada.post("/prompt", prompt=prompt)
        assert ada.status == 200, ada.error
        ada.choose("left")
        assert ada.status == 200, ada.error
    for pair in rows(app.store, Pair):
        for image, model, provenance in (
            (pair.image_0, pair.model_0, pair.provenance_0),
            (pair.image_1, pair.model_1, pair.provenance_1),
        ):
            assert files[image] == (model, pair.prompt, provenance["item"])
    assert {m for m, _, _ in files.values()} == {"generator-good", "generator-poor"}


def test_pool_refusals_name_the_candidates_flag(tmp_path, capsys):
    from pickscore.cli import main

    (tmp_path / "empty").mkdir()
    gens = tmp_path / "gens"
    (gens / "model-a" / "0").mkdir(parents=True)
    (gens / "prompts.txt").write_text("a fox\nan owl\n")
    (gens / "model-a" / "0" / "0.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "gaps").mkdir()
    (tmp_path / "gaps" / "prompts.txt").write_text("a fox\n\nan owl\n")
    for spec, words in (
        (f"pool:{tmp_path / 'nosuch'}", "no such file or directory"),
        (f"pool:{tmp_path / 'empty'}", "prompts.txt"),
        (f"pool:{gens}", "prompt 1 ('an owl')"),
        (f"pool:{gens / 'model-a'}", "prompts.txt"),
        (f"pool:{tmp_path / 'gaps'}", "prompts.txt line 2: empty"),
    ):
        db = f"sqlite:///{tmp_path / 'c.db'}"
        assert main(["collect", "--db", db, "--candidates", spec, "--port", "0"]) == 1
        error = capsys.readouterr().err
        assert f"--candidates {spec}: " in error and words in error, error
        assert not any(flag in error for flag in ("--input", "--images", "--prompts")), error


class StubGenerator:
    """A text-to-image backend that follows the documented contract (or breaks it, on request), on loopback."""

    def __init__(self):
        self.requests: list[dict] = []
        self.mode = "ok"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.mode == "down":
            return web.Response(status=503, text="warming up")
        if self.mode == "one":
            return web.json_response({"images": [{"image": base64.b64encode(_png((7, 7, 7))).decode()}] * body["n"]})
        if self.mode == "garbage":
            return web.json_response({"images": [{"image": base64.b64encode(b"not an image").decode()}] * body["n"]})
        images = [
            {
                "image": base64.b64encode(_png(((body["seed"] + k * 50) % 256, 80, 120))).decode(),
                "model": "stub-xl",
                "params": {"steps": 4},
            }
            for k in range(body["n"])
        ]
        return web.json_response({"images": images})


@pytest.fixture
def generator():
    """A StubGenerator serving POST /generate on loopback from its own thread: (stub, its URL)."""
    from aiohttp.test_utils import unused_port

    stub = StubGenerator()
    held = {}
    ready = threading.Event()
    port = unused_port()

    def run():
        import asyncio

        loop = asyncio.new_event_loop()
        web_app = web.Application()
        web_app.router.add_post("/generate", stub.handle)
        runner = web.AppRunner(web_app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        held["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    yield stub, f"http://127.0.0.1:{port}/generate"
    held["loop"].call_soon_threadsafe(held["loop"].stop)
    thread.join(10)


def test_an_http_generator_by_the_documented_contract(start_app, tmp_path, generator):
    stub, url = generator
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", candidates=url)
    ada = signed_in(app)
    ada.post("/prompt", prompt="a castle at dawn")
    assert ada.status == 200, ada.error
    assert stub.requests[-1]["prompt"] == "a castle at dawn" and stub.requests[-1]["n"] == 2
    ada.choose("right")
    assert ada.status == 200 and stub.requests[-1]["n"] == 1  # only the rejected side is regenerated
    pair = rows(app.store, Pair)[0]
    assert pair.model_0 == "stub-xl" and pair.provenance_0["params"] == {"steps": 4}
    assert pair.provenance_0["url"].endswith("/generate") and "seed" in pair.provenance_0
    before = counts(app.store)
    for mode, words in (("down", "HTTP 503"), ("garbage", "not a decodable image")):
        stub.mode = mode
        ada.get("/")
        ada.choose("left")
        assert ada.status == 503 and words in ada.error, ada.error
        assert counts(app.store) == before  # a failed generation stores nothing; the choice can be retried
    stub.mode = "ok"
    ada.get("/")
    ada.choose("left")
    assert ada.status == 200 and counts(app.store)["choices"] == before["choices"] + 1


# A choice is never lost to how candidates are drawn ------------------------------------------------------------


def test_a_choice_after_a_restart_with_a_fixed_seed_is_stored_beside_a_new_image(start_app, db_url):
    """A restarted app with the same --seed draws what it drew before: the kept image itself, then the one just
    rejected. The choice is stored and the kept image gets a new one beside it."""
    settings = dict(db=db_url, candidates="synthetic", seed=3, image_size=64)
    first = start_app(**settings)
    ada = signed_in(first)
    ada.post("/prompt", prompt=PROMPT)
    shown = ada.pair
    first.close()
    second = start_app(**settings)
    ada.base = second.url  # the same session: its signing secret is in the database
    for label, kept, other in (("left", "image_0", "image_1"), ("right", "image_1", "image_0")):
        ada.get("/")
        before = ada.pair
        ada.choose(label)
        assert ada.status == 200, ada.error
        after = ada.pair
        assert after[kept] == before[kept] and after[other] not in (before["image_0"], before["image_1"])
    assert shown["pair"] < after["pair"] and counts(second.store)["choices"] == 2


def test_a_pool_prompt_with_two_images_takes_every_choice(start_app, tmp_path):
    """Keeping one of a prompt's only two images: the other is all the pool can offer beside it, so it comes back."""
    table = pa.table({"prompt": ["a fox"] * 2, "image": [_png((200, 0, 0)), _png((0, 200, 0))], "model": ["a", "b"]})
    pq.write_table(table, tmp_path / "fox.parquet")
    settings = dict(db=f"sqlite:///{tmp_path / 'c.db'}", candidates=f"pool:{tmp_path / 'fox.parquet'}", seed=0)
    ada = None
    for start in range(2):  # and again after a restart, which replays the draws
        app = start_app(**settings)
        ada = ada or signed_in(app)
        ada.base = app.url
        if start == 0:
            ada.post("/prompt", prompt="a fox")
        for label in ["left", "right", "left", "left", "right", "right", "tie", "left"]:
            ada.get("/")
            before = ada.pair
            ada.choose(label)
            assert ada.status == 200, (label, ada.error)
            assert {ada.pair["image_0"], ada.pair["image_1"]} == {before["image_0"], before["image_1"]}
        assert counts(app.store)["choices"] == 8 * (start + 1)
        app.close()


def test_a_generator_that_can_only_repeat_the_kept_image_ends_the_round_with_the_choice_stored(
    start_app, tmp_path, generator
):
    stub, url = generator
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", candidates=url)
    ada = signed_in(app)
    ada.post("/prompt", prompt="a castle at dawn")
    stub.mode = "one"  # every image it makes from now on is the same one
    ada.choose("left")
    assert ada.status == 200, ada.error
    stuck = ada.pair["image_1"]
    ada.choose("right")  # keep the only image the generator makes: nothing new can go beside it
    assert ada.status == 200 and ada.pair is None and 'id="round-ended"' in ada.body, ada.error
    assert counts(app.store)["choices"] == 2 and rows(app.store, ChoiceRow)[-1].label == "right"
    assert rows(app.store, Pair)[-1].image_1 == stuck
    ada.post("/prompt", prompt="a castle at dusk")  # a new prompt still needs two different images
    assert ada.status == 400 and "too few" in ada.error and counts(app.store)["pairs_shown"] == 2


def test_pickscore_ordering_shows_the_closest_pair_and_records_it(start_app, tmp_path, tiny_hf_dir):
    from pickscore.server.app import ServerThread
    from tests.server.conftest import settings_for

    with ServerThread(settings_for(tiny_hf_dir)) as server:
        address = f"127.0.0.1:{server.server.port}"
        app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", seed=5, image_size=64, order_server=address, order_pool=4)
        ada = signed_in(app)
        ada.post("/prompt", prompt=PROMPT)
        assert ada.status == 200, ada.error
        ada.choose("left")
        assert ada.status == 200, ada.error
        first, second = rows(app.store, Pair)
        for pair in (first, second):
            ordering = pair.ordering
            assert ordering["by"] == "pickscore" and ordering["server"] == address and ordering["model"]
            scores = ordering["scores"]
            assert {pair.image_0, pair.image_1} <= set(scores)
        # The new pair: the two closest of the four drawn.
        drawn = first.ordering["drawn"]
        assert len(drawn) >= 3
        gap = abs(first.ordering["scores"][first.image_0] - first.ordering["scores"][first.image_1])
        assert gap == min(
            abs(first.ordering["scores"][a] - first.ordering["scores"][b]) for a in drawn for b in drawn if a != b
        )
        # The replacement: the drawn candidate closest to the image that stayed.
        kept, new = second.image_0, second.image_1
        assert kept == first.image_0
        s = second.ordering["scores"]
        assert abs(s[new] - s[kept]) == min(abs(s[d] - s[kept]) for d in second.ordering["drawn"])


# The admin page and the schema --------------------------------------------------------------------------------


def test_admin_page_counts_and_win_rates(start_app, tmp_path):
    app = start_app(db=f"sqlite:///{tmp_path / 'c.db'}", seed=2, image_size=64, admins="root")
    ada = signed_in(app)
    ada.post("/prompt", prompt=PROMPT)
    labels = ["left", "right", "tie", "left", "left", "right", "tie", "left"]
    for label in labels:
        ada.choose(label)
    ada.get("/admin")
    assert ada.status == 403 and "not one of --admins" in ada.error
    root = signed_in(app, "root")
    page = root.get("/admin")
    assert root.status == 200
    assert "<th>choices</th><td>8</td>" in page and "25.0%" in page  # 2 ties of 8
    # Win rates as the admin table says them, recomputed from the database here.
    tally = {}
    with Session(app.store.engine) as s:
        for choice, pair in s.execute(select(ChoiceRow, Pair).join(Pair, Pair.id == ChoiceRow.pair_id)):
            if pair.model_0 == pair.model_1:
                continue
            for model, side in ((pair.model_0, "left"), (pair.model_1, "right")):
                won = 1.0 if choice.label == side else 0.5 if choice.label == "tie" else 0.0
                tally.setdefault(model, []).append(won)
    for model, wins in tally.items():
        assert f"<td>{model}</td><td>{len(wins)}</td>" in page
        assert f"<td>{sum(wins) / len(wins):.3f}</td>" in page
    for plot in ("hourly", "models"):
        png = root.opener.open(f"{app.url}/admin/{plot}.png").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 300


def test_migrations_build_exactly_the_models_schema(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pickscore.collect.store import Base

    engine = open_engine(db_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            tables = set(inspect(connection).get_table_names())
        assert {"users", "invitations", "images", "pairs", "choices", "settings", "alembic_version"} <= tables
        migrate(engine)  # again: a no-op
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"
            assert connection.execute(select(func.count()).select_from(User.__table__)).scalar() == 0
    finally:
        engine.dispose()


def test_a_choice_is_never_stored_without_its_next_pair(db_url):
    """Store.show writes the choice and the next pair in one transaction: when the pair cannot be written, the
    choice is not there either (and the same choice can then be made again)."""
    from pickscore.collect.store import Candidate, Choice, Store

    def png(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(buf, "PNG")
        return buf.getvalue()

    store = Store(db_url)
    try:
        user = store.sign_in("ada", consent="v1")
        left, right = Candidate(png(1), "m", {}), Candidate(png(2), "m", {})
        pair = store.show(user.id, PROMPT, left, right)
        choice = Choice(pair.id, pair.image_0, pair.image_1, "left")
        unwritable = Candidate(png(3), "m", {"not json": {1, 2}})  # fails when the pair row is written
        with pytest.raises((TypeError, StatementError), match="not JSON serializable"):
            store.show(user.id, PROMPT, left, unwritable, after=choice)
        assert store.counts()["choices"] == 0 and store.current(user.id) == pair
        store.show(user.id, PROMPT, left, Candidate(png(4), "m", {}), after=choice)
        assert store.counts()["choices"] == 1 and store.current(user.id).id > pair.id
    finally:
        store.close()


def test_the_session_cookie_is_secure_behind_a_tls_proxy(app):
    import urllib.parse
    import urllib.request

    def cookie(headers: dict) -> str:
        data = urllib.parse.urlencode({"name": "ada", "consent": "yes"}).encode()
        request = urllib.request.Request(f"{app.url}/signin", data, headers)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args):
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(request)
        except urllib.error.HTTPError as e:
            assert e.code == 303
            return e.headers["Set-Cookie"]
        raise AssertionError("no redirect after sign-in")

    plain = cookie({})
    assert "HttpOnly" in plain and "SameSite=Lax" in plain and "Secure" not in plain
    assert "Secure" in cookie({"X-Forwarded-Proto": "https"})
