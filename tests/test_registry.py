"""The record of saved slot files: names that never collide, files bioproxy may delete."""

from bioproxy.registry import NAME, Registry, filename

DIGEST, MODEL = "d" * 64, "a1b2c3d4e5f6"


def test_prefixes_that_differ_only_in_dropped_characters_get_files_of_their_own(tmp_path):
    # Issue 16.9: "@ab" and "@a/b" shared one file, and each save deleted the other's.
    names = {filename(p, DIGEST, MODEL) for p in ("@ab", "@a/b", "@a b", "@a\u00e9b", "ab")}
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
    assert (slots / filename("@a/b", DIGEST, MODEL)).exists()
    assert not (slots / filename("@ab", DIGEST, MODEL)).exists()


def test_names_saved_before_the_prefix_hash_are_still_bioproxy_s_own():
    assert NAME.fullmatch("bioproxy-code-34194bdee0e71eba-6efcfbc6c7e8.bin")
    assert not NAME.fullmatch("../etc/passwd")
    assert not NAME.fullmatch("bioproxy-code-x.bin")
