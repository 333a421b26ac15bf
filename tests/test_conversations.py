"""The saved-conversation store: round trips, owners kept apart, search, kept images, exports,
and a save that stays whole when its process is killed mid-write."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from conversations.store import DEFAULT_TITLE, NOT_FOUND, UNAVAILABLE_IMAGE, ConversationStore
from errors import BadInputError

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # the store copies bytes, it never decodes them


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    return ConversationStore(tmp_path / "store")


def image(folder: Path, name: str = "cat.png", data: bytes = PNG) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def text(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def kept_files(store: ConversationStore, conversation_id: str) -> set[str]:
    folder = store.files_dir / conversation_id
    return {path.name for path in folder.iterdir()} if folder.exists() else set()


def test_save_and_get_round_trip_text_image_and_route_note(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice")
    picture = image(tmp_path)
    messages = [
        text("user", "Describe this picture"),
        {"role": "user", "content": {"path": str(picture), "alt_text": "a cat"}},
        {"role": "assistant", "content": "Sent to the vision model.", "metadata": {"title": "Routed", "extra": [1]}},
        {"role": "assistant", "content": "A cat on a mat.", "metadata": None},
    ]
    returned = store.save("alice", conversation_id, messages)
    conversation = store.get("alice", conversation_id)

    assert conversation.id == conversation_id
    assert conversation.messages == returned
    assert [m["role"] for m in conversation.messages] == ["user", "user", "assistant", "assistant"]
    assert conversation.messages[0] == messages[0]
    assert conversation.messages[2] == messages[2]  # metadata kept as it is, extra keys too
    assert conversation.messages[3] == messages[3]
    kept = conversation.messages[1]["content"]
    assert kept["alt_text"] == "a cat"
    assert Path(kept["path"]).parent == store.files_dir / conversation_id
    assert Path(kept["path"]).read_bytes() == PNG
    assert conversation.created_at <= conversation.updated_at


def test_owners_are_kept_apart_with_the_not_found_message(store: ConversationStore) -> None:
    mine = store.create("alice", "Private plans")
    store.save("alice", mine, [text("user", "secret")])
    missing = "0" * 32

    assert store.list("bob") == []
    assert store.list("bob", "secret") == []
    for conversation_id in (mine, missing):
        for attempt in (
            lambda cid=conversation_id: store.get("bob", cid),
            lambda cid=conversation_id: store.rename("bob", cid, "Mine now"),
            lambda cid=conversation_id: store.delete("bob", cid),
            lambda cid=conversation_id: store.save("bob", cid, []),
            lambda cid=conversation_id: store.export_json("bob", cid),
        ):
            with pytest.raises(BadInputError) as caught:
                attempt()
            assert str(caught.value) == NOT_FOUND
    assert NOT_FOUND == "Conversation not found: it may have been deleted. Pick another from the list."
    still = store.get("alice", mine)
    assert (still.title, still.messages) == ("Private plans", [text("user", "secret")])


def test_list_is_newest_first_with_message_counts(store: ConversationStore) -> None:
    first = store.create("alice", "First")
    second = store.create("alice", "Second")
    store.save("alice", first, [text("user", "a"), text("assistant", "b")])  # now the newest
    summaries = store.list("alice")
    assert [(s.id, s.title, s.message_count) for s in summaries] == [(first, "First", 2), (second, "Second", 0)]
    assert summaries[0].updated_at >= summaries[1].updated_at
    assert len(store.list("alice", limit=1)) == 1


def test_search_by_title_and_message_text_case_insensitively(store: ConversationStore, tmp_path: Path) -> None:
    garden = store.create("alice", "Garden Plans")
    recipes = store.create("alice", "Cooking")
    store.save("alice", recipes, [text("user", "How long to bake Sourdough bread?")])
    store.save("alice", garden, [{"role": "user", "content": {"path": str(image(tmp_path)), "alt_text": "bread"}}])
    umlaut = store.create("alice", "ÜBER alles")

    assert {s.id for s in store.list("alice", "garden")} == {garden}
    assert {s.id for s in store.list("alice", "  SOURDOUGH ")} == {recipes}  # stripped, any case
    assert {s.id for s in store.list("alice", "über")} == {umlaut}  # beyond ASCII too
    assert {s.id for s in store.list("alice", "bread")} == {recipes}  # image alt text is not message text
    assert store.list("alice", "role") == []  # the JSON around the text is not searched
    assert len(store.list("alice", "")) == 3


def test_search_wildcards_are_plain_characters(store: ConversationStore) -> None:
    percent = store.create("alice", "Discount 50% off")
    underscore = store.create("alice", "Plain title")
    store.save("alice", underscore, [text("user", "call my_function")])
    backslash = store.create("alice", r"C:\temp")
    store.create("alice", "Nothing special")

    assert {s.id for s in store.list("alice", "%")} == {percent}
    assert {s.id for s in store.list("alice", "_")} == {underscore}
    assert {s.id for s in store.list("alice", "\\")} == {backslash}
    assert store.list("alice", "50_") == []
    with pytest.raises(BadInputError, match="at most 200"):
        store.list("alice", "x" * 201)


def test_rename_and_refuse_an_empty_title(store: ConversationStore) -> None:
    conversation_id = store.create("alice")
    store.rename("alice", conversation_id, "  Holiday   ideas \n")
    assert store.get("alice", conversation_id).title == "Holiday ideas"
    for bad in ("", "   ", "x" * 201):
        with pytest.raises(BadInputError, match="1 to 200 characters"):
            store.rename("alice", conversation_id, bad)
    assert store.get("alice", conversation_id).title == "Holiday ideas"


def test_delete_removes_rows_and_files(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice")
    other = store.create("alice", "Kept")
    store.save("alice", conversation_id, [{"role": "user", "content": {"path": str(image(tmp_path))}}])
    store.save("alice", other, [text("user", "stay")])
    assert (store.files_dir / conversation_id).is_dir()

    store.delete("alice", conversation_id)

    assert not (store.files_dir / conversation_id).exists()
    assert [s.id for s in store.list("alice")] == [other]
    with pytest.raises(BadInputError, match="Conversation not found"):
        store.get("alice", conversation_id)
    with closing(sqlite3.connect(tmp_path / "store" / "conversations.sqlite3")) as db:
        rows = db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,)).fetchone()
    assert rows == (0,)
    store.delete("alice", other)  # one without images (and so without a folder) deletes too


def test_images_are_copied_and_a_missing_one_becomes_a_note(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice")
    original = image(tmp_path, "upload.png")
    returned = store.save(
        "alice",
        conversation_id,
        [
            {"role": "user", "content": {"path": str(original), "alt_text": None}},
            {"role": "assistant", "content": {"path": str(tmp_path / "gone.png"), "alt_text": "lost"}},
        ],
    )
    original.unlink()  # the temporary upload goes away; the kept copy must not

    messages = store.get("alice", conversation_id).messages
    assert messages == returned
    kept = Path(messages[0]["content"]["path"])
    assert kept.is_file() and kept.read_bytes() == PNG
    assert kept.parent == store.files_dir / conversation_id
    assert kept.suffix == ".png"
    assert messages[1] == {"role": "assistant", "content": UNAVAILABLE_IMAGE}

    # Saving again what get() returned keeps the copy as it is rather than copying it anew.
    again = store.save("alice", conversation_id, messages)
    assert again[0]["content"]["path"] == str(kept)
    assert kept_files(store, conversation_id) == {kept.name}


def test_unreferenced_kept_files_are_removed_after_a_save_without_them(
    store: ConversationStore, tmp_path: Path
) -> None:
    conversation_id = store.create("alice")
    first = store.save(
        "alice",
        conversation_id,
        [
            {"role": "user", "content": {"path": str(image(tmp_path, "a.png", b"a"))}},
            {"role": "user", "content": {"path": str(image(tmp_path, "b.png", b"b"))}},
        ],
    )
    a, b = (Path(m["content"]["path"]) for m in first)
    assert kept_files(store, conversation_id) == {a.name, b.name}

    store.save("alice", conversation_id, [first[1], text("assistant", "only b now")])

    assert kept_files(store, conversation_id) == {b.name}
    assert not a.exists() and b.read_bytes() == b"b"


def test_saves_from_several_threads_keep_exactly_the_referenced_image(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice")
    failures: list[str] = []

    def save_many(worker: int) -> None:
        try:
            for turn in range(15):
                picture = image(tmp_path, f"{worker}-{turn}.png", bytes([worker, turn]))
                store.save("alice", conversation_id, [{"role": "user", "content": {"path": str(picture)}}])
                store.list("alice", "x")
                store.get("alice", conversation_id)
        except Exception as error:  # reported below: an exception in a thread would be lost
            failures.append(repr(error))

    threads = [threading.Thread(target=save_many, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    kept = Path(store.get("alice", conversation_id).messages[0]["content"]["path"])
    assert kept.is_file()
    assert kept_files(store, conversation_id) == {kept.name}  # the last save's copy, no strays


def test_automatic_title_from_the_first_user_text_until_renamed(store: ConversationStore) -> None:
    conversation_id = store.create("alice")
    assert store.get("alice", conversation_id).title == DEFAULT_TITLE
    store.save("alice", conversation_id, [text("assistant", "Hello!"), text("user", "  What is\n the   weather?  ")])
    assert store.get("alice", conversation_id).title == "What is the weather?"

    long_one = store.create("alice")
    store.save("alice", long_one, [text("user", "word " * 40)])
    title = store.get("alice", long_one).title
    assert len(title) == 60 and title.endswith("…") and title.startswith("word word")

    store.rename("alice", conversation_id, "My title")
    store.save("alice", conversation_id, [text("user", "Something else entirely")])
    assert store.get("alice", conversation_id).title == "My title"


@pytest.mark.parametrize("crafted", ["../../etc", "../" + "a" * 29, "A" * 32, "g" * 32, "a" * 31, "", None, 7])
def test_crafted_ids_are_refused_before_the_filesystem(tmp_path: Path, crafted: object) -> None:
    store = ConversationStore(tmp_path / "store")
    victim = tmp_path / "etc"  # where files/../../etc would lead
    victim.mkdir()
    (victim / "passwd").write_text("root")
    if isinstance(crafted, str):
        # Even a row carrying the crafted id (a tampered database) must not lead anywhere.
        with closing(sqlite3.connect(tmp_path / "store" / "conversations.sqlite3")) as db, db:
            db.execute("INSERT INTO conversations VALUES (?, 'alice', 'Planted', 0, 0)", (crafted,))
    picture = {"role": "user", "content": {"path": str(image(tmp_path)), "alt_text": None}}
    for attempt in (
        lambda: store.get("alice", crafted),  # type: ignore[arg-type]
        lambda: store.save("alice", crafted, [picture]),  # type: ignore[arg-type]
        lambda: store.rename("alice", crafted, "Mine"),  # type: ignore[arg-type]
        lambda: store.export_markdown("alice", crafted),  # type: ignore[arg-type]
        lambda: store.delete("alice", crafted),  # type: ignore[arg-type]
    ):
        with pytest.raises(BadInputError) as caught:
            attempt()
        assert str(caught.value) == NOT_FOUND
    assert [path.name for path in victim.iterdir()] == ["passwd"]
    assert list(store.files_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ("hello", "must be a dict"),
        ({"role": "system", "content": "x"}, "role must be 'user' or 'assistant'"),
        ({"role": "user", "content": 5}, "content must be text or an image"),
        ({"role": "user", "content": "x", "name": "bob"}, "unknown keys 'name'"),
        ({"role": "user", "content": {"path": "", "alt_text": None}}, "needs a 'path'"),
        ({"role": "user", "content": {"path": "a.png", "url": "http://x"}}, "unknown keys 'url'"),
        ({"role": "user", "content": "x", "metadata": "note"}, "metadata must be a dict"),
        ({"role": "user", "content": "x", "metadata": {"t": {1, 2}}}, "only JSON values"),
        ({"role": "user", "content": "x" * 1_000_001}, "at most 1,000,000 characters"),
        ({"role": "user", "content": "bad \ud800"}, "not valid Unicode"),
    ],
)
def test_bad_messages_are_refused_and_nothing_changes(store: ConversationStore, message: object, problem: str) -> None:
    conversation_id = store.create("alice")
    store.save("alice", conversation_id, [text("user", "kept")])
    with pytest.raises(BadInputError, match=problem):
        store.save("alice", conversation_id, [text("user", "fine"), message])  # type: ignore[list-item]
    assert store.get("alice", conversation_id).messages == [text("user", "kept")]


def test_too_many_messages_are_refused(store: ConversationStore) -> None:
    conversation_id = store.create("alice")
    with pytest.raises(BadInputError, match="at most 10,000 messages"):
        store.save("alice", conversation_id, [text("user", "x")] * 10_001)
    assert store.save("alice", conversation_id, [text("user", "x")] * 10_000)[-1] == text("user", "x")


def test_export_markdown(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice", "Trip")
    saved = store.save(
        "alice",
        conversation_id,
        [
            text("user", "Show me a [cat]"),
            {"role": "assistant", "content": "Using the image model.", "metadata": {"title": "Route"}},
            {"role": "assistant", "content": {"path": str(image(tmp_path)), "alt_text": "a [cat]"}},
            {"role": "assistant", "content": "Here it is.\nEnjoy."},
        ],
    )
    name = Path(saved[2]["content"]["path"]).name

    assert store.export_markdown("alice", conversation_id).split("\n") == [
        "# Trip",
        "",
        "**User:** Show me a [cat]",
        "",
        "> Route: Using the image model.",
        "",
        f"**Assistant:** ![a \\[cat\\]](files/{name})",
        "",
        "**Assistant:** Here it is.",
        "Enjoy.",
        "",
    ]
    assert store.export_markdown("alice", store.create("alice", "Empty")) == "# Empty\n\n"


def test_export_json(store: ConversationStore, tmp_path: Path) -> None:
    conversation_id = store.create("alice", "Café ☕")
    saved = store.save(
        "alice",
        conversation_id,
        [
            text("user", "Bonjour"),
            {"role": "assistant", "content": {"path": str(image(tmp_path)), "alt_text": None}, "metadata": {"k": 1}},
        ],
    )
    exported = store.export_json("alice", conversation_id)
    conversation = store.get("alice", conversation_id)

    assert "Café ☕" in exported and "\n  " in exported  # ensure_ascii=False, pretty-printed
    document = json.loads(exported)
    assert document == {
        "id": conversation_id,
        "title": "Café ☕",
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
        "messages": [
            text("user", "Bonjour"),
            {
                "role": "assistant",
                "content": {"path": "files/" + Path(saved[1]["content"]["path"]).name, "alt_text": None},
                "metadata": {"k": 1},
            },
        ],
    }


CHILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from conversations.store import ConversationStore

store = ConversationStore(Path({folder!r}))
count = 0
while True:
    count += 1
    # Each list is one longer than the last, with bodies of varied size so a save takes a while.
    messages = [
        {{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {{i}} " + "x" * (i % 7 * 300)}}
        for i in range(count)
    ]
    store.save("alice", {conversation_id!r}, messages)
    print(count, flush=True)
"""


def saves_until_killed(folder: Path, conversation_id: str, delay_s: float) -> int:
    """Run the saving child, SIGKILL it ``delay_s`` after its 20th save (so at some point within
    a later save), and return the last count it printed."""
    code = textwrap.dedent(CHILD).format(root=str(ROOT), folder=str(folder), conversation_id=conversation_id)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stderr is not None
    try:
        printed = ""
        while not printed.endswith("20\n"):
            line = child.stdout.readline()
            assert line, f"the child stopped early: {child.stderr.read()}"
            printed += line
        time.sleep(delay_s)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        printed += child.stdout.read()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return int(printed.split("\n")[:-1][-1])  # a count is printed whole or not at all: drop the tail


def test_a_save_killed_mid_write_leaves_a_whole_conversation(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    # Several kills at different moments, so some land inside a save's transaction.
    for delay_s in [0.001 * k for k in range(20)]:
        conversation_id = ConversationStore(folder).create("alice")
        last_printed = saves_until_killed(folder, conversation_id, delay_s)
        assert last_printed >= 20

        messages = ConversationStore(folder).get("alice", conversation_id).messages
        assert len(messages) in (last_printed, last_printed + 1)
        for i, message in enumerate(messages):
            expected = f"message {i} " + "x" * (i % 7 * 300)
            assert message == {"role": "user" if i % 2 == 0 else "assistant", "content": expected}
        with closing(sqlite3.connect(folder / "conversations.sqlite3")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
