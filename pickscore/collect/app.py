"""``pickscore collect``: the Pick-a-Pic web app, so a team can gather its own preference data.

    app = CollectApp(CollectSettings(db="collect.db", candidates="synthetic"))
    await app.start()          # http://HOST:PORT/ ; app.port once started
    ...
    await app.stop()

A person signs in (a name, or a name and an invitation token with ``--invited-only``) after agreeing to the consent
notice (nothing about them is stored before), writes a prompt and sees two candidates; they choose left, right or
tie (buttons, or the arrow keys: left, right, down for a tie). The rejected image is replaced (both, on a tie) and
they choose again, until they write a new prompt. Pages are rendered on the server with a little JavaScript for
the keys; every form posts and redirects (POST, then 303 to GET), so reloading a page never repeats a choice.

Each choice is checked against the pair the user was shown (its id, both image ids, unanswered, still the newest),
then recorded together with the next pair in one transaction (``store.Store.show``). Refusals map once to HTTP
statuses (``pickscore.status``) and come back as a page that says what was wrong.

``/admin`` (the names given to ``--admins``; everyone signed in when none are given) shows counts, choices per
hour, the tie rate, each model's win rate and the users' agreement, with plots.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from pickscore.collect import report
from pickscore.collect.settings import CollectSettings
from pickscore.collect.sources import PickScoreOrdered, Source, distinct, open_source
from pickscore.collect.store import MAX_PROMPT_CHARS, Candidate, Choice, ShownPair, Store, User, clean_prompt
from pickscore.errors import Forbidden, InvalidInput, PickScoreError, Unauthenticated
from pickscore.status import http_status_of

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "pickscore_collect"
MAX_FORM_BYTES = 64 * 1024
DRAWS = 3  # tries at candidates that were not just shown before settling for what the source repeats
CONSENT = """\
This app records the choices you make between pairs of images: the prompt you write, the two images shown, which \
one you prefer (or a tie), when, and the name you sign in with. The records are used to train and evaluate \
models that predict which images people prefer, and may be shared with the people running this study. Do not \
write personal information into prompts. You can stop at any time; ask the people running this study to delete \
your records."""


def _consent(settings: CollectSettings) -> tuple[str, str]:
    """The notice and its version (a hash of its text: a changed notice is agreed to again)."""
    text = Path(settings.consent_file).read_text() if settings.consent_file else CONSENT
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


class CollectApp:
    def __init__(self, settings: CollectSettings, store: Store | None = None, source: Source | None = None):
        self.settings = settings
        self.store = store or Store(settings.db)
        seed = None if settings.seed < 0 else settings.seed
        self.source = source or open_source(settings.candidates, settings.image_size, seed)
        self.ordered = (
            PickScoreOrdered(self.source, settings.order_server, settings.order_pool) if settings.order_server else None
        )
        self.admins = {n.strip() for n in settings.admins.split(",") if n.strip()}
        self.consent_text, self.consent_version = _consent(settings)
        self.secret = self.store.secret()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )
        self.app = web.Application(middlewares=[self._errors], client_max_size=MAX_FORM_BYTES)
        self.app.add_routes(
            [
                web.get("/", self.home),
                web.get("/signin", self.signin_page),
                web.post("/signin", self.signin),
                web.post("/signout", self.signout),
                web.post("/prompt", self.prompt),
                web.post("/choose", self.choose),
                web.get("/image/{id:[0-9a-f]{64}}", self.image),
                web.get("/admin", self.admin),
                web.get("/admin/{plot:hourly|models}.png", self.admin_plot),
                web.get("/healthz", self.health),
                web.static("/static", HERE / "static"),
            ]
        )
        self.runner: web.AppRunner | None = None
        self.port = settings.port
        self._summarised: tuple[int | None, dict[str, Any]] | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        log.info("collect: http://%s:%d/ (%s)", self.settings.host, self.port, self.source.description)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.ordered is not None:
            await self.ordered.close()
        self.store.close()

    # Sessions: a signed user id in a cookie; forms carry a token derived from it --------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    async def _user(self, request: web.Request) -> User | None:
        user_id, _, signature = request.cookies.get(COOKIE, "").partition(".")
        if not user_id.isdigit() or not hmac.compare_digest(signature, self._sign(f"user:{user_id}")):
            return None
        user = await _db(self.store.user, int(user_id))
        return user if user is not None and user.consent_version == self.consent_version else None

    def _csrf(self, user: User) -> str:
        return self._sign(f"form:{user.id}")

    async def _form(self, request: web.Request) -> tuple[User, Any]:
        """The signed-in user and their form, or the refusal: not signed in (401), a form not from our page (403)."""
        user = await self._user(request)
        if user is None:
            raise Unauthenticated("sign in (and agree to the consent notice) first")
        form = await request.post()
        if not hmac.compare_digest(str(form.get("csrf", "")), self._csrf(user)):
            raise Forbidden("form: not sent from this app's page (reload the page and try again)")
        return user, form

    def _page(self, template: str, http_status: int = 200, **context: Any) -> web.Response:
        user = context.setdefault("user", None)
        if user is not None:  # the header's admin link and sign-out form
            context.update(csrf=self._csrf(user), admin=self._is_admin(user))
        body = self.templates.get_template(template).render(title=self.settings.title, **context)
        return web.Response(
            text=body, status=http_status, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except PickScoreError as e:
            status = http_status_of(e)
            log.info("collect: %s %s -> %d: %s", request.method, request.path, status, e)
            user = await self._user(request)
            return self._page("error.html", status, message=str(e), status=status, user=user)

    # Pages ------------------------------------------------------------------------------------------------

    async def signin_page(self, request: web.Request) -> web.Response:
        return self._page(
            "signin.html", consent=self.consent_text, invited_only=self.settings.invited_only, name="", error=""
        )

    async def signin(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            user = await _db(
                self.store.sign_in,
                str(form.get("name", "")),
                self.consent_version if form.get("consent") == "yes" else None,
                str(form.get("invitation", "")),
                invited_only=self.settings.invited_only,
            )
        except PickScoreError as e:
            return self._page(
                "signin.html",
                http_status_of(e),
                consent=self.consent_text,
                invited_only=self.settings.invited_only,
                name=str(form.get("name", ""))[:100],
                error=str(e),
            )
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE,
            f"{user.id}.{self._sign(f'user:{user.id}')}",
            httponly=True,
            samesite="Lax",
            max_age=180 * 24 * 3600,
            # Behind a TLS-terminating proxy the app sees plain HTTP; the proxy's X-Forwarded-Proto says https.
            # (A forged header can only make the cookie stricter.)
            secure=request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https",
        )
        raise response

    async def signout(self, request: web.Request) -> web.Response:
        await self._form(request)
        response = web.HTTPSeeOther("/signin")
        response.del_cookie(COOKIE)
        raise response

    async def home(self, request: web.Request) -> web.Response:
        user = await self._user(request)
        if user is None:
            raise web.HTTPSeeOther("/signin")
        pair = await _db(self.store.current, user.id)
        last = pair.prompt if pair else await _db(self.store.last_prompt, user.id)
        return self._page(
            "collect.html",
            user=user,
            pair=pair,
            prompt=last or "",
            suggestions=list(self.source.prompts())[:1000],
            max_prompt=MAX_PROMPT_CHARS,
            round_ended=pair is None and request.query.get("round") == "ended",
        )

    async def prompt(self, request: web.Request) -> web.Response:
        user, form = await self._form(request)
        prompt = clean_prompt(str(form.get("prompt", "")))
        found = await self._candidates(prompt, kept=None, exclude=set())
        if found is None:
            raise InvalidInput(f"prompt {prompt!r}: the source has too few images for it")
        (left, right), ordering = found
        await _db(self.store.show, user.id, prompt, left, right, ordering)
        raise web.HTTPSeeOther("/")

    async def choose(self, request: web.Request) -> web.Response:
        user, form = await self._form(request)
        pair_id = str(form.get("pair", ""))
        if not pair_id.isdigit():
            raise InvalidInput(f"pair: {pair_id[:40]!r} is not a pair id")
        choice = Choice(
            int(pair_id), str(form.get("image_0", "")), str(form.get("image_1", "")), str(form.get("choice"))
        )
        pair = await _db(self.store.check, user.id, choice)
        following = await self._next_pair(pair, choice.label)
        if following is None:  # the source has nothing to show next: the choice is kept and the round ends
            await _db(self.store.choose, user.id, choice)
            raise web.HTTPSeeOther("/?round=ended")
        left, right, ordering = following
        await _db(self.store.show, user.id, pair.prompt, left, right, ordering, after=choice)
        raise web.HTTPSeeOther("/")

    async def _next_pair(
        self, pair: ShownPair, label: str
    ) -> tuple[Candidate, Candidate, dict[str, Any] | None] | None:
        """What follows a choice: the winner stays on its side and the rejected image (both, on a tie) is replaced;
        a fresh pair when the source offers nothing beside the winner; None when it cannot offer two images."""
        shown = {pair.image_0, pair.image_1}
        if label != "tie":
            side = 0 if label == "left" else 1
            kept = await _db(self.store.candidate, pair.id, side)
            found = await self._candidates(pair.prompt, kept, shown)
            if found is not None:
                (new,), ordering = found
                return (kept, new, ordering) if side == 0 else (new, kept, ordering)
        found = await self._candidates(pair.prompt, None, shown)
        if found is None:
            return None
        (left, right), ordering = found
        return left, right, ordering

    async def _candidates(
        self, prompt: str, kept: Candidate | None, exclude: set[str]
    ) -> tuple[list[Candidate], dict[str, Any] | None] | None:
        """Two new candidates, or (with ``kept``) one to go beside it, and how a served PickScore ordered them; None
        when ``DRAWS`` draws bring too few. ``kept`` never comes back (one image against itself); images in
        ``exclude`` only when no draw brings others (a source drawn with a fixed seed replays its draws on restart,
        and a small pool has nothing else)."""
        need = 1 if kept else 2
        repeated = None
        for _ in range(DRAWS):
            if self.ordered is not None:
                drawn, ordering = await self.ordered.order(prompt, kept, exclude)
            else:
                drawn, ordering = await self.source.draw(prompt, need, exclude), None
            usable = [c for c in distinct(drawn) if kept is None or c.id != kept.id]
            new = [c for c in usable if c.id not in exclude]
            if len(new) >= need:
                return new[:need], ordering
            if repeated is None and len(usable) >= need:
                repeated = usable[:need], ordering
        return repeated

    async def image(self, request: web.Request) -> web.Response:
        if await self._user(request) is None:
            raise Unauthenticated("sign in to see images")
        found = await _db(self.store.image, request.match_info["id"])
        if found is None:
            raise web.HTTPNotFound(text="no such image")
        data, mime = found
        return web.Response(body=data, content_type=mime, headers={"Cache-Control": "private, max-age=31536000"})

    def _is_admin(self, user: User) -> bool:
        return not self.admins or user.name in self.admins

    async def _admin_user(self, request: web.Request) -> User:
        user = await self._user(request)
        if user is None:
            raise Unauthenticated("sign in first")
        if not self._is_admin(user):
            raise Forbidden(f"admin: {user.name!r} is not one of --admins")
        return user

    async def admin(self, request: web.Request) -> web.Response:
        user = await self._admin_user(request)
        summary = await _db(self._summary)
        return self._page("admin.html", user=user, summary=summary, source=self._description())

    async def admin_plot(self, request: web.Request) -> web.Response:
        await self._admin_user(request)
        summary = await _db(self._summary)
        draw = report.plot_hourly if request.match_info["plot"] == "hourly" else report.plot_models
        png = await asyncio.to_thread(draw, summary)
        return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})

    def _summary(self) -> dict[str, Any]:
        """report.summary, computed again only when there are new choices (a page and its two plots read one)."""
        newest = self.store.newest_choice()
        if self._summarised is None or self._summarised[0] != newest:
            self._summarised = (newest, report.summary(self.store))
        return self._summarised[1]

    def _description(self) -> str:
        return (self.ordered or self.source).description

    async def health(self, request: web.Request) -> web.Response:
        counts = await _db(self.store.counts)
        return web.json_response({"status": "ok", **counts})


async def _db(function, *args, **kwargs):
    """The database off the event loop: a slow query or a locked SQLite file never stalls other requests."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def serve(settings: CollectSettings) -> None:
    """Run the app until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    app = CollectApp(settings)
    await app.start()
    print(f"collect: http://{settings.host}:{app.port}/  ({app._description()}; database {settings.db})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app.stop()
