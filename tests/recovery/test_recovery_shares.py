"""dmgn.recovery: specs, splitting, per-share checks, mixing, and how many more are needed."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shamir_mnemonic.wordlist import WORDLIST

from dmgn.errors import InvalidInput
from dmgn.recovery import (
    Group,
    NotEnoughShares,
    Recovery,
    Scheme,
    ShareRejected,
    check_share,
    mnemonics_in_file,
    parse_scheme,
    recover_seed,
    share_file_text,
    split_seed,
)

SEED = bytes(range(32))
THREE_OF_FIVE = parse_scheme("3-of-5")
SHARES = split_seed(SEED, THREE_OF_FIVE)


@pytest.mark.parametrize(
    ("spec", "scheme"),
    [
        ("3-of-5", Scheme(1, (Group("", 3, 5),))),
        ("3 of 5", Scheme(1, (Group("", 3, 5),))),
        (" 2 -of- 2 ", Scheme(1, (Group("", 2, 2),))),
        (
            "2-of-3 family, 1 of lawyer",
            Scheme(2, (Group("family", 2, 3), Group("lawyer", 1, 1))),
        ),
        (
            "2 of 3 Family,1 of lawyer",
            Scheme(2, (Group("family", 2, 3), Group("lawyer", 1, 1))),
        ),
        (
            "2 groups: 2-of-3 family, 1 of lawyer, 3-of-4 friends",
            Scheme(2, (Group("family", 2, 3), Group("lawyer", 1, 1), Group("friends", 3, 4))),
        ),
        (
            "1 of groups: 1 of safe, 1 of bank",
            Scheme(1, (Group("safe", 1, 1), Group("bank", 1, 1))),
        ),
    ],
)
def test_share_specs_parse(spec: str, scheme: Scheme) -> None:
    assert parse_scheme(spec) == scheme


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("5-of-3", "1 <= k <= n <= 16"),
        ("3-of-17", "1 <= k <= n <= 16"),
        ("1-of-3", "full copies"),
        ("2 of family", "say how many shares group 'family' gets, e.g. \"2-of-3 family\""),
        ("2-of-3 family, 1 of family", "names a group twice"),
        ("3 groups: 1 of a, 1 of b", "between 1 and 2"),
        ("three of five", "not understood"),
        ("2-of-3 Fam/ily", "group name"),
        ("", "not understood"),
    ],
)
def test_bad_share_specs_are_refused_with_what_to_do(spec: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=None) as caught:
        parse_scheme(spec)
    assert says in str(caught.value)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 16).flatmap(lambda n: st.tuples(st.integers(2 if n > 1 else 1, n), st.just(n)))
)
def test_any_k_of_n_spec_parses_to_itself(kn: tuple[int, int]) -> None:
    k, n = kn
    assert parse_scheme(f"{k}-of-{n}") == Scheme(1, (Group("", k, n),))


def test_a_dmgn_share_is_33_words_and_its_repr_hides_them() -> None:
    assert len(SHARES) == 5
    assert all(len(share.words) == 33 for share in SHARES)
    assert SHARES[0].words[0] not in repr(SHARES[0])
    # One split: every share starts with the same two identifier words.
    assert len({tuple(share.words[:2]) for share in SHARES}) == 1


def test_every_three_of_five_rebuild_the_seed_and_two_do_not() -> None:
    for choice in itertools.combinations(SHARES, 3):
        assert recover_seed(share.mnemonic for share in choice) == SEED
    for pair in itertools.combinations(SHARES, 2):
        with pytest.raises(NotEnoughShares, match="2 shares given, 1 more share needed"):
            recover_seed(share.mnemonic for share in pair)


def test_progress_counts_down_to_enough() -> None:
    recovery = Recovery()
    assert recovery.add(SHARES[4].mnemonic).describe() == "2 more shares needed"
    assert recovery.add(SHARES[0].mnemonic).describe() == "1 more share needed"
    with pytest.raises(ShareRejected, match="already entered"):
        recovery.add(SHARES[0].mnemonic)
    last = recovery.add(SHARES[2].mnemonic)
    assert last.complete and last.shares_entered == 3
    assert recovery.seed() == SEED


def test_groups_need_every_group_and_say_what_is_known() -> None:
    scheme = parse_scheme("2-of-3 family, 1 of lawyer")
    shares = split_seed(SEED, scheme)
    family, lawyer = shares[:3], shares[3]
    recovery = Recovery()
    first = recovery.add(family[0].mnemonic)
    # The lawyer group's threshold is unknown until one of its shares is seen: "at least".
    assert first.more_needed == 2 and not first.exact
    assert recovery.add(family[2].mnemonic).describe() == (
        "at least 1 more share needed (1 of 2 groups complete)"
    )
    with pytest.raises(NotEnoughShares):
        recovery.seed()
    assert recovery.add(lawyer.mnemonic).complete
    assert recovery.seed() == SEED
    # The whole family without the lawyer is not enough.
    with pytest.raises(NotEnoughShares):
        recover_seed(share.mnemonic for share in family)


def test_two_of_three_groups_any_two_groups_suffice() -> None:
    scheme = parse_scheme("2 groups: 2-of-3 family, 1 of lawyer, 1 of safe")
    shares = split_seed(SEED, scheme)
    assert recover_seed([shares[3].mnemonic, shares[4].mnemonic]) == SEED
    assert recover_seed([shares[0].mnemonic, shares[1].mnemonic, shares[4].mnemonic]) == SEED


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, 32), replacement=st.sampled_from(WORDLIST))
def test_one_changed_word_is_named_by_its_position(position: int, replacement: str) -> None:
    words = SHARES[1].words
    if words[position] == replacement:
        return
    changed = [*words[:position], replacement, *words[position + 1 :]]
    with pytest.raises(ShareRejected) as caught:
        check_share(" ".join(changed))
    assert f"word {position + 1} ({replacement!r}) of this share is wrong" in str(caught.value)


def test_each_position_is_named_exactly() -> None:
    words = SHARES[3].words
    for position in range(33):
        changed = list(words)
        changed[position] = "zero" if words[position] != "zero" else "yoga"
        with pytest.raises(ShareRejected, match=rf"^word {position + 1} \("):
            check_share(" ".join(changed))


def test_two_changed_words_are_not_blamed_on_one() -> None:
    words = list(SHARES[2].words)
    words[5], words[20] = (
        ("zero" if words[5] != "zero" else "yoga"),
        ("acid" if words[20] != "acid" else "acne"),
    )
    with pytest.raises(ShareRejected, match="more than one word"):
        check_share(" ".join(words))


def test_unknown_missing_and_numbered_words() -> None:
    words = SHARES[0].words
    with pytest.raises(ShareRejected, match=r"word 4 'acnee' is not a SLIP-39 share word \(did"):
        check_share(" ".join([*words[:3], "acnee", *words[4:]]))
    with pytest.raises(ShareRejected, match="more than one word of this share is wrong or missing"):
        check_share(" ".join(words[:9] + words[10:]))  # word 10 left out: the rest shift
    with pytest.raises(ShareRejected, match="19 words"):
        check_share(" ".join(words[:19]))
    with pytest.raises(ShareRejected, match="empty"):
        check_share("   ")
    # The numbered layout `dmgn export` prints, and any capitalisation, are accepted.
    numbered = " ".join(f"{i}. {w.upper()}" for i, w in enumerate(words, 1))
    assert check_share(numbered).words() == words


def test_shares_of_two_splits_are_refused() -> None:
    other = split_seed(SEED, THREE_OF_FIVE)  # same seed, fresh split
    recovery = Recovery()
    recovery.add(SHARES[0].mnemonic)
    recovery.add(SHARES[1].mnemonic)
    with pytest.raises(ShareRejected, match="from a different split"):
        recovery.add(other[2].mnemonic)
    # Refused without loss: the recovery goes on with a share of the right split.
    assert recovery.add(SHARES[2].mnemonic).complete
    assert recovery.seed() == SEED


def test_same_identifier_from_another_split_fails_the_digest() -> None:
    # Shares of two splits that happen to share the 15-bit identifier: only the digest
    # check tells them apart.
    import shamir_mnemonic as slip39
    from shamir_mnemonic import shamir

    def split(seed: bytes) -> list[str]:
        ems = slip39.EncryptedMasterSecret.from_master_secret(seed, b"", 7, True, 1)
        return [s.mnemonic() for s in shamir.split_ems(1, [(3, 5)], ems)[0]]

    a, b = split(SEED), split(os.urandom(32))
    recovery = Recovery()
    for mnemonic in (a[0], a[1], b[2]):
        recovery.add(mnemonic)
    with pytest.raises(ShareRejected, match="do not combine"):
        recovery.seed()


def test_a_share_passphrase_changes_the_seed_it_opens() -> None:
    locked = split_seed(SEED, parse_scheme("2-of-3"), "tea at five")
    assert recover_seed([s.mnemonic for s in locked[:2]], "tea at five") == SEED
    assert recover_seed([s.mnemonic for s in locked[:2]]) != SEED
    with pytest.raises(InvalidInput, match="printable ASCII"):
        split_seed(SEED, parse_scheme("2-of-3"), "thé")


def test_share_file_round_trips_and_says_what_it_is() -> None:
    text = share_file_text(SHARES[0], THREE_OF_FIVE)
    assert text.startswith("# dmgn identity share (SLIP-39): share 1 of 5\n")
    assert "any 3 of 5 shares" in text
    assert mnemonics_in_file(text) == [SHARES[0].mnemonic]
