"""Usernames and passwords: how a name is folded and checked, what a password must be.

Usernames are folded before they are stored or looked up: NFKC, surrounding whitespace dropped,
case-folded. A new name must then be 1..64 letters, digits or `.`, `_`, `-`, `@`, with no
whitespace anywhere, letters of one script only (Latin, Cyrillic, Greek, ... ; Han, Hiragana
and Katakana count as one), and must not look like a name that exists already once letters that
look alike across scripts (Cyrillic `а` and Latin `a`, digit `0` and letter `o`, ...) are mapped
to one form.

Passwords: 12..256 characters, at least 5 different ones, not a run such as `abcdef...` or
`123456...`, not containing the username, and not one of the commonly chosen passwords below —
also once digits and symbols are taken off its ends or out altogether (`Summer2024!` is
`summer`, `P@ssw0rd` is `password`).
"""

from __future__ import annotations

import itertools
import unicodedata

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 256
MAX_USERNAME_CHARS = 64
_USERNAME_PUNCTUATION = frozenset("._-@")
_SAME_SCRIPT = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "CJK": "CJK"}

# Letters that look alike across scripts, and digits that pass for letters: each maps to the
# Latin letter a reader would take it for.
_LOOK_ALIKE = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i",
        "ј": "j", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g", "ь": "b",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v",
        "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "γ": "y",
        # digits and Latin pairs that read alike
        "0": "o", "1": "l", "3": "e", "5": "s", "i": "l", "|": "l",
    }
)

# Commonly chosen passwords and the words most of them are built on; compared with the lowered
# password, with digits and symbols stripped from its ends, and with its letters only.
COMMON_PASSWORDS = frozenset(
    ["password", "passw0rd", "passwort", "motdepasse", "contrasena", "wachtwoord", "salasana", "haslo", "parola", "123456", "1234567", "12345678", "123456789", "1234567890", "12345678910", "123123", "111111", "000000", "121212", "654321", "112233", "123321", "666666", "696969", "777777", "888888", "999999", "987654321", "11111111", "1q2w3e4r", "1qaz2wsx", "qazwsx", "qwerty", "qwertyuiop", "qwertz", "azerty", "asdfgh", "asdfghjkl", "zxcvbnm", "zxcvbn", "abc123", "abcdef", "abcdefgh", "iloveyou", "letmein", "welcome", "welcomeback", "changeme", "changeit", "default", "secret", "secure", "security", "admin", "administrator", "root", "toor", "login", "master", "superuser", "guest", "user", "test", "tester", "testing", "demo", "sample", "example", "trustno1", "access", "hello", "hellothere", "goodbye", "monkey", "dragon", "shadow", "sunshine", "princess", "football", "baseball", "basketball", "soccer", "hockey", "starwars", "superman", "batman", "spiderman", "pokemon", "naruto", "minecraft", "mustang", "ferrari", "corvette", "freedom", "whatever", "nothing", "something", "anything", "everything", "computer", "internet", "michael", "jennifer", "jessica", "ashley", "daniel", "charlie", "jordan", "thomas", "robert", "matthew", "andrew", "joshua", "william", "hunter", "george", "michelle", "amanda", "nicole", "anthony", "harley", "ranger", "buster", "summer", "winter", "spring", "autumn", "fall", "january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december", "monday", "tuesday", "friday", "sunday", "weekend", "holiday", "flower", "lovely", "loveme", "lover", "love", "cookie", "cheese", "coffee", "chocolate", "banana", "orange", "apple", "pepper", "ginger", "tigger", "killer", "dallas", "yankees", "cowboys", "liverpool", "arsenal", "chelsea", "barcelona", "hospital", "clinic", "clinical", "clinician", "doctor", "nurse", "radiology", "radiologist", "radiographer", "medical", "medicine", "patient", "patients", "health", "healthcare", "mri", "scanner", "triage", "imaging", "neuro", "brain", "cardio", "surgery", "theatre", "ward", "emergency", "labeling", "labelling", "label", "annotator", "mriassets", "qwerty123", "password1", "password123", "letmein123", "welcome1", "welcome123", "admin123", "abcd1234", "aa123456", "asdf1234", "zaq12wsx", "q1w2e3r4", "passpass", "mypassword", "newpassword", "ourpassword", "yourpassword", "thepassword", "temp", "temporary", "temppass", "startup", "begin", "start"]
)

_KEY_ROWS = ("abcdefghijklmnopqrstuvwxyz", "1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm",
             "qwertzuiop", "azertyuiop")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a",
                       "$": "s", "!": "i"})


class UsernameProblem(ValueError):
    pass


class PasswordProblem(ValueError):
    pass


def username_key(raw: str) -> str:
    """The form a username is stored and looked up in: NFKC, stripped, case-folded."""
    return unicodedata.normalize("NFKC", raw).strip().casefold()


def _script(ch: str) -> str:
    head = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _SAME_SCRIPT.get(head, head)


def look_alike_form(key: str) -> str:
    """`key` with letters that look alike across scripts mapped to one Latin form."""
    return key.translate(_LOOK_ALIKE)


def checked_username(raw: object) -> str:
    """The folded username, or UsernameProblem saying what is wrong with it."""
    if not isinstance(raw, str):
        raise UsernameProblem("a username must be text")
    key = username_key(raw)
    if not key:
        raise UsernameProblem("a username must not be empty")
    if len(key) > MAX_USERNAME_CHARS:
        raise UsernameProblem(f"a username has at most {MAX_USERNAME_CHARS} characters")
    for ch in key:
        if ch.isspace():
            raise UsernameProblem("a username must not hold spaces or other whitespace")
        if not (ch.isalnum() or ch in _USERNAME_PUNCTUATION):
            raise UsernameProblem(
                f"a username holds letters, digits and . _ - @ only (not {ch!r})"
            )
    scripts = {_script(ch) for ch in key if ch.isalpha()}
    if len(scripts) > 1:
        raise UsernameProblem(
            f"a username must not mix scripts ({', '.join(sorted(scripts)).lower()}): "
            "letters from different alphabets can pass for one another"
        )
    return key


def _is_run(text: str) -> bool:
    if len(text) < 4:
        return False
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(text)}
    if steps <= {1} or steps <= {-1} or steps == {0}:
        return True
    return any(text in row * 4 or text[::-1] in row * 4 for row in _KEY_ROWS)


def check_password(password: object, username: str = "") -> None:
    """Raise PasswordProblem when `password` breaks the policy (see the module docstring)."""
    if not isinstance(password, str):
        raise PasswordProblem("a password must be text")
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordProblem(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordProblem(f"a password has at most {MAX_PASSWORD_CHARS} characters")
    if len(set(password)) < 5:
        raise PasswordProblem("a password needs at least 5 different characters")
    lowered = password.casefold()
    trimmed = lowered.strip("0123456789!@#$%^&*()_+-=[]{};:'\",.<>/?\\|`~ ")
    letters = "".join(ch for ch in lowered if ch.isalpha())
    digits = "".join(ch for ch in lowered if ch.isdigit())
    squeezed = "".join(ch for ch in lowered if ch.isalnum())
    forms = {lowered, trimmed, letters, squeezed, lowered.translate(_LEET),
             trimmed.translate(_LEET)}
    if forms & COMMON_PASSWORDS or (digits == squeezed and digits in COMMON_PASSWORDS):
        raise PasswordProblem("this password is on the list of commonly chosen passwords")
    if _is_run(squeezed) or _is_run(lowered):
        raise PasswordProblem("a password must not be a run of keys or letters (abcd..., 1234...)")
    name = username_key(username) if username else ""
    if len(name) >= 3 and name in lowered:
        raise PasswordProblem("a password must not contain the username")
