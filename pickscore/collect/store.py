"""The collection database: who chose, between which two images, for which prompt, and where the images came from.

    store = Store("sqlite:///collect.db")          # or postgresql+psycopg://user@host/db; migrated on open
    user = store.sign_in("ada", consent=CONSENT_VERSION)
    pair = store.show(user.id, "a red fox", left, right)          # Candidates: image bytes + provenance
    store.show(user.id, "a red fox", left, new_right, after=Choice(pair.id, pair.image_0, pair.image_1, "left"))

Tables (``pickscore/collect/migrations`` creates and upgrades them with Alembic):

- ``users``: a name, the consent they gave (its version and time) and, when sign-in is by invitation, the token.
  A user row exists only once its person has agreed to the consent notice: nothing about anyone is stored before.
- ``invitations``: tokens an admin handed out (``pickscore collect invite``).
- ``images``: every image shown, stored once under the SHA-256 of its bytes.
- ``pairs``: a prompt and two images shown to a user, with each image's model and provenance (which source made
  it, with what) and, when a served PickScore chose the pair, how. The newest unanswered pair is what the user sees.
- ``choices``: at most one per pair (a unique constraint): left, right or tie, and when.

Every write is one transaction: a choice, the images that replace the rejected one and the next pair are committed
together or not at all, so a server killed mid-request leaves either the old state or the new one. The database's
URL, engine and migrations are database.py's.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pickscore.collect.database import insert_ignore, open_engine
from pickscore.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from pickscore.model.preprocess import decode_image

MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 64
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
# Explicit bidi embeddings, overrides and isolates (and their ends): the "Trojan Source" characters.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}


def utcnow() -> datetime:
    """Naive UTC: the same value in SQLite and PostgreSQL (``timestamp without time zone``)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS), unique=True)
    consent_version: Mapped[str] = mapped_column(String(64))
    consented_at: Mapped[datetime] = mapped_column(DateTime)
    invitation: Mapped[str | None] = mapped_column(String(64), ForeignKey("invitations.token"), unique=True)


class Invitation(Base):
    __tablename__ = "invitations"
    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)


class StoredImage(Base):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of data, hex
    data: Mapped[bytes] = mapped_column(LargeBinary)
    mime: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Pair(Base):
    __tablename__ = "pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    image_0: Mapped[str] = mapped_column(ForeignKey("images.id"))
    image_1: Mapped[str] = mapped_column(ForeignKey("images.id"))
    model_0: Mapped[str] = mapped_column(String(200))
    model_1: Mapped[str] = mapped_column(String(200))
    provenance_0: Mapped[dict[str, Any]] = mapped_column(JSON)
    provenance_1: Mapped[dict[str, Any]] = mapped_column(JSON)
    ordering: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # how a served PickScore picked this pair
    shown_at: Mapped[datetime] = mapped_column(DateTime)


class ChoiceRow(Base):
    __tablename__ = "choices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(8))
    label_0: Mapped[float] = mapped_column(Float)
    label_1: Mapped[float] = mapped_column(Float)
    chosen_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Setting(Base):
    """Values the app keeps across restarts (the session-signing secret)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class Candidate:
    """An image offered for a prompt: its encoded bytes, the model that made it and how (source-specific)."""

    image: bytes = field(repr=False)
    model: str
    provenance: dict[str, Any]

    @property
    def id(self) -> str:
        return image_id(self.image)


@dataclass(frozen=True)
class Choice:
    """What a user's form says: the pair, the two images it showed, and left, right or tie."""

    pair_id: int
    image_0: str
    image_1: str
    label: str


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_image(data: bytes, what: str) -> tuple[str, int, int]:
    """(mime type, width, height) of an encoded image, or InvalidInput naming ``what`` and the reason: the
    scorer's own decoder (its formats, its pixel-limit check from the header), under this app's limits."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{what}: {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        img = decode_image(data, MAX_IMAGE_PIXELS)
    except InvalidInput as e:
        raise InvalidInput(f"{what}: {e}") from None
    return img.get_format_mimetype(), img.width, img.height


def clean_prompt(text: str) -> str:
    """``text`` with every run of whitespace (tabs and line breaks included) made one space, or InvalidInput: empty,
    too long, or holding a control character (Unicode Cc: NUL, ESC, DEL, C1) or a bidi embedding, override or
    isolate (U+202A-E, U+2066-9: they reorder how the prompt, and the dataset's captions, are shown), named by code
    point and position. Other format characters (joiners in emoji and scripts, bidi marks) stay."""
    prompt = " ".join(text.split())
    if not prompt:
        raise InvalidInput("prompt: empty; write what the images should show")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt: {len(prompt)} characters, over the {MAX_PROMPT_CHARS}-character limit")
    for at, char in enumerate(prompt, 1):
        if unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS:
            kind = "a bidi control (it reorders how text is shown)" if char in BIDI_CONTROLS else "a control character"
            raise InvalidInput(f"prompt: U+{ord(char):04X} at character {at} is {kind}; write the prompt without it")
    return prompt


def clean_name(text: str) -> str:
    name = " ".join(text.split())
    if not name:
        raise InvalidInput("name: empty; sign in with your name")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidInput(f"name: at most {MAX_NAME_CHARS} printable characters")
    return name


@dataclass(frozen=True)
class ShownPair:
    id: int
    prompt: str
    image_0: str
    image_1: str
    model_0: str
    model_1: str
    ordering: dict[str, Any] | None


class Store:
    """The app's one way into the database; each method is one transaction."""

    def __init__(self, url: str, create: bool = True):
        """Open (and migrate) the database at ``url``; without ``create``, refuse a SQLite file that is not there."""
        self.url = url
        self.engine = open_engine(url, create)

    def close(self) -> None:
        self.engine.dispose()

    def secret(self) -> bytes:
        """The key that signs session cookies: made once, kept in the database so restarts keep users signed in."""
        with Session(self.engine) as s, s.begin():
            insert_ignore(s, Setting.__table__, [{"key": "session_secret", "value": secrets.token_hex(32)}])
            return bytes.fromhex(s.get(Setting, "session_secret").value)

    # People ---------------------------------------------------------------------------------------------

    def invite(self, note: str = "") -> str:
        token = secrets.token_urlsafe(24)
        with Session(self.engine) as s, s.begin():
            s.add(Invitation(token=token, note=note[:200], created_at=utcnow()))
        return token

    def sign_in(self, name: str, consent: str | None, invitation: str | None = None, *, invited_only=False) -> User:
        """The user called ``name``, created on first sign-in, which needs ``consent`` (the notice's version).

        With ``invited_only``, a new name needs an unused invitation token, and a known name its own token.
        """
        name = clean_name(name)
        if not consent:
            raise Forbidden("consent: read the notice and agree to it before anything is stored")
        with Session(self.engine) as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if invited_only:
                token = (invitation or "").strip()
                if user is not None:
                    if not token or not secrets.compare_digest(token, user.invitation or ""):
                        raise Unauthenticated(f"invitation: wrong token for {name!r}")
                elif not token or s.get(Invitation, token) is None:
                    raise Unauthenticated("invitation: not a token this app issued")
                elif s.scalar(select(User).where(User.invitation == token)) is not None:
                    raise Unauthenticated("invitation: this token is already in use by another name")
            if user is None:
                user = User(
                    name=name,
                    consent_version=consent,
                    consented_at=utcnow(),
                    invitation=(invitation or "").strip() or None if invited_only else None,
                )
                s.add(user)
            elif user.consent_version != consent:
                user.consent_version, user.consented_at = consent, utcnow()  # agreed to a newer notice
            s.flush()
            s.expunge(user)
            return user

    def user_names(self) -> dict[int, str]:
        with Session(self.engine) as s:
            return dict(s.execute(select(User.id, User.name)).all())

    def user(self, user_id: int) -> User | None:
        with Session(self.engine) as s:
            user = s.get(User, user_id)
            if user is not None:
                s.expunge(user)
            return user

    # Pairs and choices -----------------------------------------------------------------------------------

    def current(self, user_id: int) -> ShownPair | None:
        """The newest pair shown to the user, when it is still unanswered."""
        with Session(self.engine) as s:
            pair = s.scalar(select(Pair).where(Pair.user_id == user_id).order_by(Pair.id.desc()).limit(1))
            if pair is None or s.scalar(select(ChoiceRow.id).where(ChoiceRow.pair_id == pair.id)) is not None:
                return None
            return _shown(pair)

    def last_prompt(self, user_id: int) -> str | None:
        with Session(self.engine) as s:
            return s.scalar(select(Pair.prompt).where(Pair.user_id == user_id).order_by(Pair.id.desc()).limit(1))

    def show(
        self,
        user_id: int,
        prompt: str,
        left: Candidate,
        right: Candidate,
        ordering: dict[str, Any] | None = None,
        *,
        after: Choice | None = None,
    ) -> ShownPair:
        """Store the images and a new pair for the user; with ``after``, first record that choice (the pair it
        answers must be the user's current one, and unanswered), all in one transaction."""
        prompt = clean_prompt(prompt)
        images = []
        for side, candidate in (("left", left), ("right", right)):
            mime, width, height = check_image(candidate.image, f"{side} image from {candidate.model}")
            images.append(
                dict(
                    id=candidate.id,
                    data=candidate.image,
                    mime=mime,
                    width=width,
                    height=height,
                    created_at=utcnow(),
                )
            )
        try:
            with Session(self.engine) as s, s.begin():
                if after is not None:
                    self._record(s, user_id, after)
                insert_ignore(s, StoredImage.__table__, images)
                pair = Pair(
                    user_id=user_id,
                    prompt=prompt,
                    image_0=left.id,
                    image_1=right.id,
                    model_0=left.model,
                    model_1=right.model,
                    provenance_0=left.provenance,
                    provenance_1=right.provenance,
                    ordering=ordering,
                    shown_at=utcnow(),
                )
                s.add(pair)
                s.flush()
                return _shown(pair)
        except IntegrityError:
            # Two submissions of one choice raced; the unique pair_id let one of them commit.
            raise Conflict(f"pair {after.pair_id if after else '?'}: already chosen") from None

    def choose(self, user_id: int, choice: Choice) -> None:
        """Record ``choice`` with no next pair (the source had nothing more to show); checked as ``show`` checks."""
        try:
            with Session(self.engine) as s, s.begin():
                self._record(s, user_id, choice)
        except IntegrityError:
            raise Conflict(f"pair {choice.pair_id}: already chosen") from None

    def check(self, user_id: int, choice: Choice) -> ShownPair:
        """The pair ``choice`` answers, or the reason it cannot be recorded (read only; ``show`` checks again)."""
        with Session(self.engine) as s:
            return _shown(self._pair_for(s, user_id, choice))

    def _pair_for(self, s: Session, user_id: int, choice: Choice) -> Pair:
        if choice.label not in LABELS:
            raise InvalidInput(f"choice: {choice.label!r} is not one of {', '.join(LABELS)}")
        pair = s.get(Pair, choice.pair_id)
        if pair is None or pair.user_id != user_id:
            raise NotFound(f"pair {choice.pair_id}: not a pair shown to you")
        if (choice.image_0, choice.image_1) != (pair.image_0, pair.image_1):
            raise InvalidInput(f"pair {choice.pair_id}: the images sent are not the images shown")
        if s.scalar(select(ChoiceRow.id).where(ChoiceRow.pair_id == pair.id)) is not None:
            raise Conflict(f"pair {pair.id}: already chosen")
        newest = s.scalar(select(func.max(Pair.id)).where(Pair.user_id == user_id))
        if newest != pair.id:
            raise Conflict(f"pair {pair.id}: no longer shown (a newer pair replaced it)")
        return pair

    def _record(self, s: Session, user_id: int, choice: Choice) -> None:
        pair = self._pair_for(s, user_id, choice)
        label_0, label_1 = LABELS[choice.label]
        s.add(
            ChoiceRow(
                pair_id=pair.id,
                user_id=user_id,
                label=choice.label,
                label_0=label_0,
                label_1=label_1,
                chosen_at=utcnow(),
            )
        )
        s.flush()  # the unique pair_id refuses a second choice here, before the next pair is added

    def candidate(self, pair_id: int, side: int) -> Candidate:
        """The image on ``side`` (0 left, 1 right) of a pair, as the candidate it was shown as."""
        with Session(self.engine) as s:
            pair = s.get(Pair, pair_id)
            image = s.get(StoredImage, pair.image_1 if side else pair.image_0)
            model, provenance = (pair.model_1, pair.provenance_1) if side else (pair.model_0, pair.provenance_0)
            return Candidate(image.data, model, provenance)

    def image(self, image_id: str) -> tuple[bytes, str] | None:
        with Session(self.engine) as s:
            row = s.get(StoredImage, image_id)
            return None if row is None else (row.data, row.mime)

    # Reading it all back ---------------------------------------------------------------------------------

    def choices(self, batch: int = 256) -> Iterator[dict[str, Any]]:
        """Every choice with its pair, in the order they were made (images not loaded)."""
        query = (
            select(
                ChoiceRow.id,
                ChoiceRow.user_id,
                ChoiceRow.label,
                ChoiceRow.label_0,
                ChoiceRow.label_1,
                ChoiceRow.chosen_at,
                Pair.prompt,
                Pair.image_0,
                Pair.image_1,
                Pair.model_0,
                Pair.model_1,
            )
            .join(Pair, Pair.id == ChoiceRow.pair_id)
            .order_by(ChoiceRow.id)
        )
        with Session(self.engine) as s:
            for row in s.execute(query.execution_options(yield_per=batch)):
                yield row._asdict()

    def newest_choice(self) -> int | None:
        with Session(self.engine) as s:
            return s.scalar(select(func.max(ChoiceRow.id)))

    def images(self, ids: Sequence[str]) -> dict[str, bytes]:
        with Session(self.engine) as s:
            return dict(s.execute(select(StoredImage.id, StoredImage.data).where(StoredImage.id.in_(set(ids)))).all())

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as s:
            return {
                "users": s.scalar(select(func.count()).select_from(User)),
                "prompts": s.scalar(select(func.count(func.distinct(Pair.prompt)))),
                "images": s.scalar(select(func.count()).select_from(StoredImage)),
                "pairs_shown": s.scalar(select(func.count()).select_from(Pair)),
                "choices": s.scalar(select(func.count()).select_from(ChoiceRow)),
            }


def _shown(pair: Pair) -> ShownPair:
    return ShownPair(pair.id, pair.prompt, pair.image_0, pair.image_1, pair.model_0, pair.model_1, pair.ordering)
