"""A SQLite store of saved conversations, one owner's list apart from another's.

Each message is one row (conversation id, position, JSON body), so a save replaces the whole list
in one transaction: after a crash a conversation holds either the old list or the new one. Images
a conversation shows are copied under ``files/<conversation id>/`` so they outlive the temporary
files they came from; the database stores only the copy's file name, never a path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from errors import BadInputError

DEFAULT_TITLE = "New conversation"
UNAVAILABLE_IMAGE = "(image no longer available)"
NOT_FOUND = "Conversation not found: it may have been deleted. Pick another from the list."

MAX_MESSAGES = 10_000
MAX_TEXT_CHARS = 1_000_000
MAX_TITLE_CHARS = 200
MAX_QUERY_CHARS = 200
AUTO_TITLE_CHARS = 60

_ID = re.compile(r"[0-9a-f]{32}")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_ROLES = ("user", "assistant")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        created_at REAL,
        updated_at REAL
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        conversation_id TEXT REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER,
        body TEXT,
        PRIMARY KEY (conversation_id, position)
    )""",
    "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated_at)",
)


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated_at: float
    message_count: int


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created_at: float
    updated_at: float
    messages: list[dict[str, Any]]


class ConversationStore:
    """Conversations in ``folder/conversations.sqlite3``, their images under ``folder/files``.

    A connection is opened per operation rather than one shared behind a lock: SQLite already
    arbitrates between connections (WAL lets readers go on while one writer commits, also across
    processes), a slow image copy in one Gradio worker does not hold a Python lock the others
    wait on, and no connection outlives the thread that used it.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = Path(folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(exist_ok=True)
        self._database = self._folder / "conversations.sqlite3"
        # The journal mode is stored in the database file, so setting it once here is enough;
        # it cannot change inside a transaction, hence outside _transaction.
        connection = sqlite3.connect(self._database, timeout=10, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
        with self._transaction(write=True) as db:
            for statement in _SCHEMA:
                db.execute(statement)

    @property
    def files_dir(self) -> Path:
        """Where kept images live (the UI lets the browser load images from here)."""
        return self._folder / "files"

    # -- public operations ------------------------------------------------------------------

    def create(self, owner: str, title: str = DEFAULT_TITLE) -> str:
        """A new empty conversation; returns its id."""
        title = _check_title(title)
        conversation_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction(write=True) as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, owner, title, now, now),
            )
        return conversation_id

    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        """The owner's conversations, newest updated first, optionally only those whose title or
        any message text contains ``query`` (case-insensitive, taken literally)."""
        if not isinstance(query, str):
            raise BadInputError("The search must be text: type the words to look for.")
        query = query.strip()
        if len(query) > MAX_QUERY_CHARS:
            raise BadInputError(f"The search is too long: use at most {MAX_QUERY_CHARS} characters.")
        _check_unicode(query, "The search")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise BadInputError("The number of conversations to list must be a whole number of at least 1.")
        sql = """SELECT c.id, c.title, c.updated_at,
                        (SELECT COUNT(*) FROM messages AS m WHERE m.conversation_id = c.id)
                 FROM conversations AS c WHERE c.owner = ?"""
        parameters: list[Any] = [owner]
        if query:
            # LIKE takes % and _ as wildcards: escape them (and the escape character itself) so
            # the query is a plain substring. fold() makes it case-insensitive beyond ASCII.
            pattern = "%" + _escape_like(query.casefold()) + "%"
            sql += r""" AND (fold(c.title) LIKE ? ESCAPE '\'
                        OR EXISTS (SELECT 1 FROM messages AS m
                                   WHERE m.conversation_id = c.id
                                     AND json_type(m.body, '$.content') = 'text'
                                     AND fold(json_extract(m.body, '$.content')) LIKE ? ESCAPE '\'))"""
            parameters += [pattern, pattern]
        # rowid breaks ties between conversations updated within the same clock tick.
        sql += " ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?"
        parameters.append(limit)
        with self._transaction(write=False) as db:
            rows = db.execute(sql, parameters).fetchall()
        return [ConversationSummary(id=row[0], title=row[1], updated_at=row[2], message_count=row[3]) for row in rows]

    def get(self, owner: str, conversation_id: str) -> Conversation:
        """The conversation with its messages; image paths point at the kept copies."""
        _check_id(conversation_id)
        with self._transaction(write=False) as db:  # one read transaction: title and messages agree
            title, created_at, updated_at = self._owned(db, owner, conversation_id)
            bodies = self._bodies(db, conversation_id)
        folder = self._conversation_dir(conversation_id)
        messages = [_with_image_path(body, lambda name: str(folder / name)) for body in bodies]
        return Conversation(conversation_id, title, created_at, updated_at, messages)

    def save(self, owner: str, conversation_id: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace all the conversation's messages at once; returns them with image paths
        rewritten to the kept copies (and missing images turned into a short note)."""
        _check_id(conversation_id)
        if not isinstance(messages, list):
            raise BadInputError("The messages must be a list: send the whole conversation as a list of messages.")
        if len(messages) > MAX_MESSAGES:
            raise BadInputError(
                f"A conversation can hold at most {MAX_MESSAGES:,} messages: start a new conversation to go on."
            )
        checked = [_check_message(index, message) for index, message in enumerate(messages)]
        folder = self._conversation_dir(conversation_id)
        created: list[Path] = []
        try:
            # The write lock is taken before any file is copied, so a concurrent delete or the
            # clean-up of a concurrent save cannot see (and remove) copies not yet committed.
            with self._transaction(write=True) as db:
                self._owned(db, owner, conversation_id)
                stored = [self._keep_image(message, folder, created) for message in checked]
                db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
                db.executemany(
                    "INSERT INTO messages (conversation_id, position, body) VALUES (?, ?, ?)",
                    [
                        (conversation_id, position, json.dumps(message, ensure_ascii=False))
                        for position, message in enumerate(stored)
                    ],
                )
                title = _automatic_title(stored)
                db.execute(
                    """UPDATE conversations SET updated_at = ?,
                           title = CASE WHEN title = ? AND ? IS NOT NULL THEN ? ELSE title END
                       WHERE id = ?""",
                    (time.time(), DEFAULT_TITLE, title, title, conversation_id),
                )
        except BaseException:
            for path in created:  # nothing refers to them: the transaction did not commit
                path.unlink(missing_ok=True)
            raise
        self._remove_unreferenced(conversation_id)
        return [_with_image_path(message, lambda name: str(folder / name)) for message in stored]

    def rename(self, owner: str, conversation_id: str, title: str) -> None:
        """Give the conversation a new title (this stops the automatic title)."""
        _check_id(conversation_id)
        title = _check_title(title)
        with self._transaction(write=True) as db:
            self._owned(db, owner, conversation_id)
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, owner: str, conversation_id: str) -> None:
        """Remove the conversation, its messages and its kept images."""
        _check_id(conversation_id)
        with self._transaction(write=True) as db:
            self._owned(db, owner, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))  # messages cascade
        # After the commit: if removing files fails, the conversation is still gone, not half-deleted.
        with suppress(FileNotFoundError):  # a conversation without images has no folder
            shutil.rmtree(self._conversation_dir(conversation_id))

    def export_markdown(self, owner: str, conversation_id: str) -> str:
        """The conversation as Markdown; images as ``files/<name>`` links next to the export."""
        conversation, bodies = self._for_export(owner, conversation_id)
        blocks = [_markdown_block(body) for body in bodies]
        return f"# {conversation.title}\n\n" + "\n\n".join(blocks) + ("\n" if blocks else "")

    def export_json(self, owner: str, conversation_id: str) -> str:
        """The conversation as pretty-printed JSON; image paths as ``files/<name>``."""
        conversation, bodies = self._for_export(owner, conversation_id)
        document = {
            "id": conversation.id,
            "title": conversation.title,
            "created_at": conversation.created_at,
            "updated_at": conversation.updated_at,
            "messages": [_with_image_path(body, lambda name: f"files/{name}") for body in bodies],
        }
        return json.dumps(document, indent=2, ensure_ascii=False)

    # -- internals ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A fresh connection holding one transaction, committed on success, rolled back on error.

        A write transaction starts IMMEDIATE: it takes the write lock up front instead of failing
        part-way when another writer got there first.
        """
        # isolation_level=None: no implicit BEGINs, the transaction is exactly the one begun here.
        connection = sqlite3.connect(self._database, timeout=10, isolation_level=None)
        try:
            # Both are per-connection settings (and ignored inside a transaction).
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.create_function("fold", 1, _fold, deterministic=True)
            with connection:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield connection
        finally:
            connection.close()

    @staticmethod
    def _owned(db: sqlite3.Connection, owner: str, conversation_id: str) -> tuple[str, float, float]:
        """(title, created_at, updated_at) of the owner's conversation. Someone else's conversation
        gets the same error as a missing one, so an owner learns nothing about others'."""
        row = db.execute(
            "SELECT title, created_at, updated_at FROM conversations WHERE id = ? AND owner = ?",
            (conversation_id, owner),
        ).fetchone()
        if row is None:
            raise BadInputError(NOT_FOUND)
        return row

    @staticmethod
    def _bodies(db: sqlite3.Connection, conversation_id: str) -> list[dict[str, Any]]:
        rows = db.execute(
            "SELECT body FROM messages WHERE conversation_id = ? ORDER BY position", (conversation_id,)
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def _conversation_dir(self, conversation_id: str) -> Path:
        return self.files_dir / conversation_id  # the id was checked to be 32 hex characters

    def _keep_image(self, message: dict[str, Any], folder: Path, created: list[Path]) -> dict[str, Any]:
        """The message as stored: an image's path becomes the name of its copy in ``folder``
        (made now unless the file is already there); a missing image becomes a short note."""
        content = message["content"]
        if isinstance(content, str):
            return message
        source = Path(content["path"])
        try:
            source = source.resolve()
            available = source.is_file()  # not a directory or a device such as /dev/zero
        except OSError:
            available = False
        if not available:
            return {**message, "content": UNAVAILABLE_IMAGE}
        if source.parent == folder.resolve():
            name = source.name  # already kept by an earlier save
        else:
            folder.mkdir(parents=True, exist_ok=True)
            suffix = source.suffix.lower()
            name = uuid.uuid4().hex + (suffix if _SUFFIX.fullmatch(suffix) else "")
            target = folder / name
            try:
                os.link(source, target)  # instant and takes no space when on the same file system
            except OSError:
                shutil.copy2(source, target)
            created.append(target)
        return {**message, "content": {"path": name, "alt_text": content["alt_text"]}}

    def _remove_unreferenced(self, conversation_id: str) -> None:
        """Delete kept files no message refers to any more. Under the write lock, so that a save
        in progress (which copies its files while holding it) cannot lose its fresh copies."""
        folder = self._conversation_dir(conversation_id)
        if not folder.is_dir():
            return  # no images, nothing to take the write lock for
        with self._transaction(write=True) as db:
            rows = db.execute(
                """SELECT json_extract(body, '$.content.path') FROM messages
                   WHERE conversation_id = ? AND json_type(body, '$.content') = 'object'""",
                (conversation_id,),
            ).fetchall()
            referenced = {row[0] for row in rows}
            with suppress(FileNotFoundError):  # deleted meanwhile: nothing left to clean
                for path in folder.iterdir():
                    if path.name not in referenced:
                        path.unlink(missing_ok=True)

    def _for_export(self, owner: str, conversation_id: str) -> tuple[Conversation, list[dict[str, Any]]]:
        """The conversation and its stored message bodies (image paths as bare file names)."""
        _check_id(conversation_id)
        with self._transaction(write=False) as db:
            title, created_at, updated_at = self._owned(db, owner, conversation_id)
            bodies = self._bodies(db, conversation_id)
        return Conversation(conversation_id, title, created_at, updated_at, []), bodies


# -- checks on untrusted input ------------------------------------------------------------------


def _check_id(conversation_id: object) -> None:
    """Only ids this store makes (uuid4 hex) get further: no path can be built from a crafted one."""
    if not isinstance(conversation_id, str) or not _ID.fullmatch(conversation_id):
        raise BadInputError(NOT_FOUND)


def _check_title(title: object) -> str:
    if not isinstance(title, str):
        raise BadInputError("The title must be text: type a title.")
    title = " ".join(title.split())  # a title is one line: a newline would break lists and headings
    if not 1 <= len(title) <= MAX_TITLE_CHARS:
        raise BadInputError(f"The title must have 1 to {MAX_TITLE_CHARS} characters: type a shorter or non-empty one.")
    _check_unicode(title, "The title")
    return title


def _check_unicode(text: str, what: str) -> None:
    """SQLite stores UTF-8: a lone surrogate (from a broken client) cannot be stored."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{what} contains characters that are not valid Unicode: remove them.") from None


def _check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise BadInputError(f"{what} is too long: keep it to at most {MAX_TEXT_CHARS:,} characters.")
    _check_unicode(text, what)


def _check_message(index: int, message: object) -> dict[str, Any]:
    """A checked copy of one message in one of the accepted shapes, else BadInputError."""
    where = f"Message {index + 1}"
    if not isinstance(message, dict):
        raise BadInputError(f"{where} must be a dict with 'role' and 'content': send it in that shape.")
    unknown = sorted(repr(key) for key in message if key not in ("role", "content", "metadata"))
    if unknown:
        raise BadInputError(f"{where} has unknown keys {', '.join(unknown)}: send only role, content and metadata.")
    role = message.get("role")
    if role not in _ROLES:
        raise BadInputError(f"{where}: the role must be 'user' or 'assistant', not {role!r}.")
    content = message.get("content")
    if isinstance(content, str):
        _check_text(content, f"{where}'s text")
    elif isinstance(content, dict):
        content = _check_image(content, where)
    else:
        raise BadInputError(f"{where}: the content must be text or an image dict with 'path' and 'alt_text'.")
    checked: dict[str, Any] = {"role": role, "content": content}
    if "metadata" in message:
        checked["metadata"] = _check_metadata(message["metadata"], where)
    return checked


def _check_image(content: dict[Any, Any], where: str) -> dict[str, Any]:
    unknown = sorted(repr(key) for key in content if key not in ("path", "alt_text"))
    if unknown:
        raise BadInputError(f"{where}: the image has unknown keys {', '.join(unknown)}: send only path and alt_text.")
    path = content.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise BadInputError(f"{where}: the image needs a 'path' that is a file path.")
    alt_text = content.get("alt_text")
    if alt_text is not None:
        if not isinstance(alt_text, str):
            raise BadInputError(f"{where}: the image's alt_text must be text or None.")
        _check_text(alt_text, f"{where}'s alt_text")
    return {"path": path, "alt_text": alt_text}


def _check_metadata(metadata: object, where: str) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BadInputError(f"{where}: the metadata must be a dict or None.")
    if "title" in metadata and not isinstance(metadata["title"], str):
        raise BadInputError(f"{where}: the metadata title must be text.")
    try:
        encoded = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: the metadata must hold only JSON values: text, numbers, lists, dicts.") from None
    _check_text(encoded, f"{where}'s metadata")
    return json.loads(encoded)  # a deep copy, exactly as it will read back


# -- helpers ---------------------------------------------------------------------------------------


def _fold(text: object) -> object:
    """SQL fold(): Unicode case folding (SQLite's own LIKE folds ASCII letters only)."""
    return text.casefold() if isinstance(text, str) else text


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _automatic_title(messages: list[dict[str, Any]]) -> str | None:
    """The first user text, on one line and at most AUTO_TITLE_CHARS long; None when there is none."""
    for message in messages:
        if message["role"] == "user" and isinstance(message["content"], str):
            text = " ".join(message["content"].split())
            if text:
                return text if len(text) <= AUTO_TITLE_CHARS else text[: AUTO_TITLE_CHARS - 1] + "…"
    return None


def _with_image_path(message: dict[str, Any], path_of: Callable[[str], str]) -> dict[str, Any]:
    """The stored message with its image's file name turned into a path by ``path_of``."""
    content = message["content"]
    if isinstance(content, str):
        return message
    name = Path(content["path"]).name  # a bare name in a sound database; never let it climb out
    return {**message, "content": {"path": path_of(name), "alt_text": content.get("alt_text")}}


def _markdown_block(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        text = content
    else:
        alt = " ".join((content.get("alt_text") or "image").split())
        alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
        text = f"![{alt}](files/{quote(Path(content['path']).name)})"
    metadata = message.get("metadata") or {}
    if "title" in metadata:  # a route note: shown apart from what was said
        return "\n".join(f"> {line}" if line else ">" for line in f"{metadata['title']}: {text}".split("\n"))
    speaker = "User" if message["role"] == "user" else "Assistant"
    return f"**{speaker}:** {text}"
