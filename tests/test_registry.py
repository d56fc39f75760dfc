"""The record of saved slot files: names that never collide, files bioproxy may delete."""

from bioproxy.registry import NAME, Registry, filename

DIGEST, MODEL, INSTANCE = "d" * 64, "a1b2c3d4e5f6", "0123abcd"


def test_prefixes_that_differ_only_in_dropped_characters_get_files_of_their_own(tmp_path):
    # Issue 16.9: "@ab" and "@a/b" shared one file, and each save deleted the other's.
    names = {
        filename(p, DIGEST, MODEL, INSTANCE) for p in ("@ab", "@a/b", "@a b", "@a\u00e9b", "ab")
    }
    assert len(names) == 5
    assert all(NAME.fullmatch(name) for name in names)

    slots = tmp_path / "slots"
    slots.mkdir()
    registry = Registry(str(tmp_path / "state"), str(slots))
    for prefix in ("@ab", "@a/b"):
        entry = registry.record(prefix, DIGEST, MODEL, tokens=10)
        (slots / entry["file"]).write_bytes(b"kv")
    registry.record("@ab", "e" * 64, MODEL, tokens=11)  # @ab edited: its old file goes

    assert registry.find("@a/b", DIGEST, MODEL) is not None
    assert (slots / registry.filename("@a/b", DIGEST, MODEL)).exists()
    assert not (slots / registry.filename("@ab", DIGEST, MODEL)).exists()


def test_names_saved_before_the_prefix_hash_are_still_bioproxy_s_own():
    assert NAME.fullmatch("bioproxy-code-34194bdee0e71eba-6efcfbc6c7e8.bin")
    assert NAME.fullmatch("bioproxy-code-1a2b3c4d5e6f7a8b-34194bdee0e71eba-6efcfbc6c7e8.bin")
    assert not NAME.fullmatch("../etc/passwd")
    assert not NAME.fullmatch("bioproxy-code-x.bin")


def test_two_bioproxies_sharing_a_slot_folder_never_touch_each_other_s_files(tmp_path):
    # Two bioproxies in front of one llama-server share its slot folder: with one name
    # per template, each overwrote the other's file, found it changed and deleted it.
    slots = tmp_path / "slots"
    slots.mkdir()
    one = Registry(str(tmp_path / "one"), str(slots))
    other = Registry(str(tmp_path / "other"), str(slots))
    names = []
    for registry in (one, other):
        name = registry.filename("@code", DIGEST, MODEL)
        (slots / name).write_bytes(b"kv of " + registry.instance.encode())
        names.append(registry.record("@code", DIGEST, MODEL, tokens=10)["file"])
    assert names[0] != names[1] and all(NAME.fullmatch(name) for name in names)
    assert one.check(one.find("@code", DIGEST, MODEL)) is None
    other.forget("@code")  # the other's template removed: its own file only
    assert (slots / names[0]).exists() and not (slots / names[1]).exists()


def test_a_bioproxy_keeps_its_tag_across_restarts(tmp_path):
    first = Registry(str(tmp_path / "state"), None).instance
    assert Registry(str(tmp_path / "state"), None).instance == first
    assert (tmp_path / "state" / "instance").read_text().strip() == first
    (tmp_path / "state" / "instance").write_text("not a tag\n")
    assert Registry(str(tmp_path / "state"), None).instance != "not a tag"
