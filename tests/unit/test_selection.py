"""One fingerprint of a forget set for every task (engine/data/selection.py): the sha256 of the sorted ids'
JSON array, checked against values computed by hand with `printf '[1, 2, 3]' | sha256sum`."""

from __future__ import annotations

from engine.data.selection import ids_sha256
from engine.data.tofu import TofuData

ONE_TWO_THREE = "a36b1f2c3f84522dd1005145646617d7054c0851e97c72a039c0bdfac9fa07f3"  # b'[1, 2, 3]'


def test_the_fingerprint_is_the_sha256_of_the_sorted_ids_json_array():
    assert ids_sha256([3, 1, 2]) == ids_sha256([1, 2, 3]) == ONE_TWO_THREE
    assert ids_sha256([1, 2]) != ONE_TWO_THREE
    # integers first, numerically; then strings: printf '[2, "a", "b"]' | sha256sum
    assert ids_sha256(["b", 2, "a"]) == "f523b06d10afee00df03b99572d9d151b1529dbaac6ce8525e971a57f78f2768"


def test_a_text_forget_set_is_fingerprinted_as_an_image_one():
    """TOFU's receipt used to hash ",".join(ids): the same rows now give the one fingerprint."""
    rows = [{"id": i, "question": "q", "answer": "a"} for i in (3, 1, 2)]
    empty = dict.fromkeys(
        ("full", "retain", "holdout", "forget_eval", "retain_eval", "real_authors", "world_facts"), []
    )
    data = TofuData(forget_split="forget01", num_authors=2, forget_authors=1, forget=rows, **empty)
    assert data.forget_summary()["ids_sha256"] == ONE_TWO_THREE
