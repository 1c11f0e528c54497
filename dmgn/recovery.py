"""Identity recovery with SLIP-39 shares: the seed split among people the owner trusts.

SLIP-39 (Trezor's Shamir backup standard; ``shamir-mnemonic`` is its reference implementation,
the only module of ours that imports it) splits a secret into mnemonic word lists, *shares*,
so that any ``k`` of ``n`` rebuild it and fewer than ``k`` reveal nothing about it (information-
theoretically, not merely "hard to compute"). Shares may be organised in groups ("2 of 3 family
members and the lawyer"): a group is itself a k-of-n split of one share of the top-level split.

What we split is the 32-byte ed25519 identity seed and nothing else: every key of the identity
is derived from it (:mod:`dmgn.identity`), device ids and Noise keys are per device. A share is
33 words: 2 words of split identifier (the same on every share of one split), 2 of group and
member parameters, 26 of share value and 3 of RS1024 checksum.

This module does no I/O. It parses group specs, splits, checks each share as it is typed
(naming the wrong word's position, which the checksum makes possible: see :func:`check_share`),
tells shares of different splits apart, says how many more shares are needed, and combines.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import shamir_mnemonic as slip39
from shamir_mnemonic.recovery import RecoveryState
from shamir_mnemonic.wordlist import WORD_INDEX_MAP, WORDLIST

from dmgn.errors import InvalidInput

SEED_BYTES = 32
#: SLIP-39 encodes each threshold and count in 4 bits: at most 16 groups of at most 16 shares.
MAX_GROUPS = 16
MAX_MEMBERS = 16
#: PBKDF2 rounds exponent of the SLIP-39 passphrase cipher: 10000 * 2**1 iterations per round,
#: the reference's default. The passphrase is an extra lock, not the main protection (that is
#: the threshold), so it is not worth making every recovery slow on a phone-class machine.
ITERATION_EXPONENT = 1
#: Words 1-2 carry the split's random identifier (with the iteration exponent and a flag): the
#: same on every share of one split, which is how shares of different splits are told apart.
ID_WORDS = 2
CHECKSUM_WORDS = 3
_CUSTOMIZATION = {False: b"shamir", True: b"shamir_extendable"}
#: The RS1024 generator from the SLIP-39 spec ("Checksum"), the same constants as the reference.
_GEN = (
    0xE0E040,
    0x1C1C080,
    0x3838100,
    0x7070200,
    0xE0E0009,
    0x1C0C2412,
    0x38086C24,
    0x3090FC48,
    0x21B1F890,
    0x3F3F120,
)
_QUOTED = re.compile(r'\s*(for )?"[^"]*"')
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ShareRejected(InvalidInput):
    """A share (or a set of shares) cannot be used; nothing was changed."""

    code = "bad_share"


class NotEnoughShares(InvalidInput):
    code = "not_enough_shares"


# -- the scheme: who gets shares, how many are needed -------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    """``threshold`` of this group's ``count`` shares rebuild its part (no name: no groups)."""

    name: str
    threshold: int
    count: int


@dataclass(frozen=True, slots=True)
class Scheme:
    """``groups_needed`` complete groups rebuild the seed."""

    groups_needed: int
    groups: tuple[Group, ...]

    def describe(self) -> str:
        if len(self.groups) == 1:
            only = self.groups[0]
            return f"any {only.threshold} of {only.count} shares"
        parts = ", ".join(f"{g.threshold} of {g.count} {g.name}" for g in self.groups)
        needed = (
            "all groups"
            if self.groups_needed == len(self.groups)
            else f"{self.groups_needed} of {len(self.groups)} groups"
        )
        return f"{needed}: {parts}"

    @property
    def share_count(self) -> int:
        return sum(g.count for g in self.groups)


_SIMPLE = re.compile(r"(\d+)\s*(?:-\s*of\s*-|of)\s*(\d+)")
_GROUPS_NEEDED = re.compile(r"(\d+)\s+(?:of\s+)?groups?\s*:(.*)", re.DOTALL)
_GROUP_KN = re.compile(r"(\d+)\s*(?:-\s*of\s*-|of)\s*(\d+)\s+(\S+)")
_GROUP_K = re.compile(r"(\d+)\s+of\s+(\S+)")

SCHEME_HELP = (
    'use "3-of-5" (any 3 of 5 shares), or groups such as "2-of-3 family, 1 of lawyer" (all '
    'groups needed; "1 of NAME" is a group of one share), optionally prefixed by how many '
    'groups are needed: "2 groups: 2-of-3 family, 1 of lawyer, 1 of safe"'
)


def parse_scheme(spec: str) -> Scheme:
    """``3-of-5``, ``3 of 5``, ``2-of-3 family, 1 of lawyer``, ``2 groups: ...``."""
    text = " ".join(spec.lower().split())
    simple = _SIMPLE.fullmatch(text)
    if simple:
        threshold, count = int(simple[1]), int(simple[2])
        return _checked(spec, 1, (Group("", threshold, count),))
    groups_needed: int | None = None
    prefixed = _GROUPS_NEEDED.fullmatch(text)
    if prefixed:
        groups_needed, text = int(prefixed[1]), prefixed[2]
    groups: list[Group] = []
    for item in (part.strip() for part in text.split(",")):
        with_count = _GROUP_KN.fullmatch(item)
        just_threshold = _GROUP_K.fullmatch(item)
        if with_count:
            group = Group(with_count[3], int(with_count[1]), int(with_count[2]))
        elif just_threshold and just_threshold[1] == "1":
            group = Group(just_threshold[2], 1, 1)
        elif just_threshold:
            k, name = just_threshold[1], just_threshold[2]
            raise InvalidInput(
                f"share spec {spec!r}: say how many shares group {name!r} gets, e.g. "
                f'"{k}-of-{int(k) + 1} {name}"'
            )
        else:
            raise InvalidInput(f"share spec {spec!r} is not understood at {item!r}; {SCHEME_HELP}")
        if not _NAME.fullmatch(group.name):
            raise InvalidInput(
                f"share spec {spec!r}: group name {group.name!r} must be 1-32 of a-z, 0-9, _ -"
            )
        groups.append(group)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise InvalidInput(f"share spec {spec!r} names a group twice; give each group its own name")
    return _checked(spec, len(groups) if groups_needed is None else groups_needed, tuple(groups))


def _checked(spec: str, groups_needed: int, groups: tuple[Group, ...]) -> Scheme:
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise InvalidInput(f"share spec {spec!r}: SLIP-39 allows 1 to {MAX_GROUPS} groups")
    if not 1 <= groups_needed <= len(groups):
        raise InvalidInput(
            f"share spec {spec!r}: the number of groups needed must be between 1 and {len(groups)}"
        )
    for g in groups:
        where = "" if len(groups) == 1 else f" (group {g.name})"
        if not 1 <= g.threshold <= g.count <= MAX_MEMBERS:
            raise InvalidInput(
                f"share spec {spec!r}{where}: need 1 <= k <= n <= {MAX_MEMBERS} in k-of-n"
            )
        if g.threshold == 1 and g.count > 1:
            # SLIP-39 forbids it: n copies of one secret are n single points of failure.
            raise InvalidInput(
                f"share spec {spec!r}{where}: 1-of-{g.count} would hand out {g.count} full "
                "copies of the identity; use 1 of 1, or a threshold of 2 or more"
            )
    return Scheme(groups_needed, groups)


# -- splitting ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Share:
    """One share as handed to one holder. ``repr`` never shows the words."""

    group: Group
    group_number: int  #: 1-based, as people count
    member_number: int  #: 1-based within the group
    mnemonic: str = field(repr=False)

    @property
    def words(self) -> list[str]:
        return self.mnemonic.split()

    @property
    def label(self) -> str:
        if not self.group.name:
            return f"share {self.member_number} of {self.group.count}"
        return (
            f"group {self.group.name} (#{self.group_number}), share {self.member_number} "
            f"of {self.group.count}"
        )

    @property
    def file_name(self) -> str:
        if not self.group.name:
            return f"dmgn-share-{self.member_number}.txt"
        return f"dmgn-share-{self.group.name}-{self.member_number}.txt"


def check_share_passphrase(passphrase: str) -> bytes:
    if not all(32 <= ord(c) <= 126 for c in passphrase):
        raise InvalidInput(
            "the share passphrase may only use printable ASCII characters (SLIP-39 rule): "
            "letters, digits, spaces and punctuation"
        )
    return passphrase.encode("ascii")


def split_seed(seed: bytes, scheme: Scheme, passphrase: str = "") -> list[Share]:
    """Split the identity seed into SLIP-39 shares (fresh randomness on every call)."""
    if len(seed) != SEED_BYTES:
        raise InvalidInput("internal: an identity seed is 32 bytes")
    mnemonics: list[list[str]] = slip39.generate_mnemonics(
        scheme.groups_needed,
        [(g.threshold, g.count) for g in scheme.groups],
        seed,
        check_share_passphrase(passphrase),
        extendable=True,
        iteration_exponent=ITERATION_EXPONENT,
    )
    return [
        Share(group, gi, mi, mnemonic)
        for gi, (group, members) in enumerate(zip(scheme.groups, mnemonics, strict=True), 1)
        for mi, mnemonic in enumerate(members, 1)
    ]


def share_file_text(share: Share, scheme: Scheme) -> str:
    """What ``dmgn export --shares -o DIR`` writes for one holder."""
    return (
        f"# dmgn identity share (SLIP-39): {share.label}\n"
        f"# The identity is restored from {scheme.describe()}; this share alone reveals nothing.\n"
        "# Keep it private. Restore with: dmgn import --shares FILE...\n"
        f"{share.mnemonic}\n"
    )


def mnemonics_in_file(text: str) -> list[str]:
    """The shares in a share file (or any text): one per non-comment, non-blank line."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


# -- checking one share -------------------------------------------------------------------------


def _feedback(b: int) -> int:
    return functools.reduce(operator.xor, (_GEN[i] for i in range(10) if (b >> i) & 1), 0)


#: The RS1024 state update, ``chk -> (chk & 0xFFFFF) << 10 ^ feedback(chk >> 20)``, is
#: invertible: the low 10 bits of the feedback determine the 10 bits shifted out.
_FEEDBACK = [_feedback(b) for b in range(1024)]
_SHIFTED_OUT = {f & 0x3FF: b for b, f in enumerate(_FEEDBACK)}


def _polymod(values: Iterable[int], chk: int = 1) -> int:
    for v in values:
        chk = (chk & 0xFFFFF) << 10 ^ v ^ _FEEDBACK[chk >> 20]
    return chk


def _unshift(chk: int) -> int:
    b = _SHIFTED_OUT[chk & 0x3FF]
    return b << 20 | (chk ^ _FEEDBACK[b]) >> 10


def _single_word_fixes(indices: Sequence[int]) -> set[tuple[int, int]]:
    """Every (position, word index) that would make the checksum valid by changing one word.

    RS1024's residue is linear over GF(2): changing word ``j`` by ``d`` (xor) moves the residue
    by ``d`` fed into a zero state and then shifted once for each of the ``n - 1 - j`` words
    that follow. So the error is found by undoing shifts until the residue fits in one word.
    The code's minimum distance is 4: one wrong word has exactly one fix, two have none. The
    extendable flag (word 2) picks the customisation string, so both are tried, each fix being
    kept only if it agrees with the flag it assumed.
    """
    n = len(indices)
    fixes: set[tuple[int, int]] = set()
    for extendable, customization in _CUSTOMIZATION.items():
        residue = _polymod([*customization, *indices]) ^ 1
        for position in reversed(range(n)):
            if residue == 0:
                break
            if residue < 1024:
                fixed = list(indices)
                fixed[position] ^= residue
                if _extendable_flag(fixed) == extendable:
                    fixes.add((position, fixed[position]))
                break
            residue = _unshift(residue)
    return fixes


def _extendable_flag(indices: Sequence[int]) -> bool:
    id_exp = indices[0] << 10 | indices[1]
    return bool(id_exp >> 4 & 1)


def _share_words(text: str) -> list[str]:
    # Tolerate the numbered layout the export prints ("1 academic  2 acid" or "1. academic").
    return [w for w in text.lower().split() if not w.rstrip(".):").isdigit()]


#: How much of an unknown word an error message repeats: SLIP-39 words have at most 8 letters,
#: so more is not a typo but other input (a 20 MB token was echoed whole; issue 30).
_EXCERPT_CHARS = 24


def _excerpt(word: str) -> str:
    if len(word) <= _EXCERPT_CHARS:
        return word
    return f"{word[:_EXCERPT_CHARS]}... ({len(word)} characters)"


def check_share(text: str) -> slip39.Share:
    """Parse one share, or raise :class:`ShareRejected` naming what is wrong and where."""
    words = _share_words(text)
    if not words:
        raise ShareRejected("the share is empty; type its words separated by spaces")
    indices: list[int] = []
    for position, word in enumerate(words, 1):
        index = WORD_INDEX_MAP.get(word)
        if index is None:
            # SLIP-39 words are unique in their first four letters.
            alike = [w for w in WORDLIST if len(word) >= 4 and w.startswith(word[:4])]
            hint = f" (did you mean {alike[0]!r}?)" if alike else ""
            raise ShareRejected(
                f"word {position} {_excerpt(word)!r} is not a SLIP-39 share word{hint}; check it"
            )
        indices.append(index)
    if len(words) < 20:
        raise ShareRejected(
            f"the share has {len(words)} words; a share has at least 20 (dmgn's have 33); "
            "check for missing words"
        )
    if _polymod([*_CUSTOMIZATION[_extendable_flag(indices)], *indices]) != 1:
        fixes = _single_word_fixes(indices)
        if len(fixes) == 1:
            ((position, _),) = fixes
            raise ShareRejected(
                f"word {position + 1} ({words[position]!r}) of this share is wrong (the "
                "checksum fails); compare that word with the written share and type it again"
            )
        raise ShareRejected(
            "more than one word of this share is wrong or missing (the checksum fails and no "
            "single word explains it); compare every word with the written share"
        )
    try:
        return slip39.Share.from_mnemonic(" ".join(words))
    except slip39.MnemonicError as error:
        raise ShareRejected(f"this share is not valid: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """The reference's message without the share words it quotes (they end up on screens)."""
    return _QUOTED.sub("", str(error)).replace("  ", " ").rstrip(". ").lower()


# -- collecting shares until there are enough ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a recovery stands after a share was added."""

    shares_entered: int
    more_needed: int  #: at least this many more shares (exact unless ``exact`` is False)
    exact: bool
    groups_needed: int
    groups_complete: int

    @property
    def complete(self) -> bool:
        return self.more_needed == 0

    def describe(self) -> str:
        if self.complete:
            return "enough shares: the identity can be restored"
        plural = "s" if self.more_needed != 1 else ""
        amount = f"{self.more_needed}" if self.exact else f"at least {self.more_needed}"
        groups = (
            ""
            if self.groups_needed == 1
            else f" ({self.groups_complete} of {self.groups_needed} groups complete)"
        )
        return f"{amount} more share{plural} needed{groups}"


class Recovery:
    """Shares added one at a time; each is checked on entry and against the ones before it."""

    def __init__(self) -> None:
        self._state: Any = RecoveryState()  # the reference's own bookkeeping (untyped)
        self._shares: list[slip39.Share] = []
        self._first_words: list[str] = []

    def add(self, text: str) -> Progress:
        share = check_share(text)
        words = share.words()
        if self._shares:
            self._check_fits(share, words)
        self._state.add_share(share)
        self._shares.append(share)
        self._first_words = self._first_words or words
        return self.progress()

    def _check_fits(self, share: slip39.Share, words: list[str]) -> None:
        first = self._shares[0]
        if share in self._shares:
            raise ShareRejected("this share was already entered; enter a different one")
        if share.common_parameters() != first.common_parameters():
            theirs, ours = " ".join(words[:ID_WORDS]), " ".join(self._first_words[:ID_WORDS])
            if theirs != ours:
                raise ShareRejected(
                    f"this share is from a different split: shares of one split all begin "
                    f"with the same two words ({ours!r}), this one begins with {theirs!r}; use "
                    "shares of a single `dmgn export --shares` only"
                )
            raise ShareRejected(
                "this share does not match the ones before (different group settings): it is "
                "from another split or was altered"
            )
        for other in self._shares:
            if other.group_index != share.group_index:
                continue
            if other.member_threshold != share.member_threshold:
                raise ShareRejected(
                    "this share does not match the others of its group (different threshold): "
                    "it is from another split or was altered"
                )
            if other.index == share.index:
                raise ShareRejected(
                    f"another share numbered {share.index + 1} of group {share.group_index + 1} "
                    "was already entered with different words: one of them is from another "
                    "split"
                )

    def progress(self) -> Progress:
        if not self._shares:
            return Progress(0, 1, False, 1, 0)
        first = self._shares[0]
        have: dict[int, int] = {}
        threshold: dict[int, int] = {}
        for s in self._shares:
            have[s.group_index] = have.get(s.group_index, 0) + 1
            threshold[s.group_index] = s.member_threshold
        missing_started = sorted(
            max(0, threshold[g] - have[g]) for g in have
        )  # 0 for complete groups
        complete = sum(1 for m in missing_started if m == 0)
        unstarted = first.group_count - len(have)
        # Cheapest way to finish: the started groups closest to complete, then unstarted
        # groups, whose thresholds are unknown (at least 1 share each) until a share arrives.
        costs = [(m, True) for m in missing_started] + [(1, False)] * unstarted
        costs.sort(key=lambda c: c[0])
        chosen = costs[: first.group_threshold]
        return Progress(
            shares_entered=len(self._shares),
            more_needed=sum(m for m, _ in chosen),
            exact=all(known for _, known in chosen),
            groups_needed=first.group_threshold,
            groups_complete=complete,
        )

    def master_secret(self, passphrase: str = "") -> bytes:
        """The secret the shares were split from (any length: test vectors use 16 bytes)."""
        progress = self.progress()
        if not progress.complete:
            raise NotEnoughShares(
                f"{progress.shares_entered} share{'s' if progress.shares_entered != 1 else ''} "
                f"given, {progress.describe()}; nothing was changed"
            )
        try:
            secret: bytes = self._state.recover(check_share_passphrase(passphrase))
        except slip39.MnemonicError as error:
            raise ShareRejected(
                f"the shares do not combine ({_reason(error)}): at least one is from another "
                "split or was altered; nothing was changed"
            ) from None
        return secret

    def seed(self, passphrase: str = "") -> bytes:
        """The identity seed. A wrong share passphrase gives another seed, not an error."""
        secret = self.master_secret(passphrase)
        if len(secret) != SEED_BYTES:
            raise ShareRejected(
                f"these shares hold a {len(secret)}-byte secret, not a dmgn identity (32 bytes); "
                "they were made by another program"
            )
        return secret


def recover_seed(mnemonics: Iterable[str], passphrase: str = "") -> bytes:
    recovery = Recovery()
    for mnemonic in mnemonics:
        recovery.add(mnemonic)
    return recovery.seed(passphrase)
