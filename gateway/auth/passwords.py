"""Password hashes: argon2id, shared by every login the gateway checks (OPC UA, control.db).

hash_password() uses the OWASP argon2id parameters (19 MiB, 2 passes, 1 lane: ~25 ms per check)
rather than argon2-cffi's heavier defaults (~150 ms): the OPC UA server checks passwords on the
event loop. Any argon2 hash verifies by the parameters written in it. No pydantic or asyncua
here: the config model imports this module.
"""

from __future__ import annotations

import functools
import logging

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["dummy_hash", "hash_password", "is_argon2_hash", "verify_password"]

log = logging.getLogger(__name__)

_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def hash_password(plain: str) -> str:
    """Return an argon2id hash of `plain`."""
    if not plain:
        raise ValueError("an empty password cannot be hashed")
    return _HASHER.hash(plain)


def is_argon2_hash(text: str) -> bool:
    """Whether `text` is an argon2 PHC string whose parameters parse."""
    if not isinstance(text, str) or not text.startswith("$argon2"):
        return False
    try:
        argon2.extract_parameters(text)
    except (InvalidHashError, ValueError):
        return False
    return True


@functools.cache
def dummy_hash() -> str:
    """A hash to verify against when the username is unknown, so an unknown name costs what a
    wrong password costs and the timing does not tell which usernames exist. Made on first use:
    every config load imports this module."""
    return _HASHER.hash("opstwin: no such user")


def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches `password_hash`; a hash that cannot be checked is a no."""
    try:
        return _HASHER.verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        log.exception("cannot verify a password against the stored hash")
        return False
