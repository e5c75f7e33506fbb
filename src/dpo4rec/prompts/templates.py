"""Prompt templates: one place for every text we send to the LLM.

Factorized preference prompts after KAR (arXiv 2306.10933): the user's
history, then a list of the factors that decide taste in that domain, so that
even a small model covers them. Templates are ``str.format`` strings with
named fields; titles are passed as values, so braces or quotes inside a
title can never break the formatting. Override any of them from config
(``[prompts] user_template = "..."``) with the same fields.
"""

from __future__ import annotations

import string

from dpo4rec.errors import InputError

USER_TEMPLATES = {
    "movies": (
        "{profile}Here are the movies this user watched, oldest first, with their ratings (1-5 stars):\n"
        "{history}\n\n"
        "Describe this user's movie preferences in a few sentences. Consider genre, director and actors, "
        "time period and country, characters, plot and theme, mood and tone, critical acclaim, "
        "production quality and soundtrack."
    ),
    "beauty": (
        "Here are the beauty products this customer bought, oldest first:\n"
        "{history}\n\n"
        "Describe this customer's preferences in a few sentences. Consider brand, product type, "
        "ingredients or skin concern, price level, style and quality."
    ),
    "generic": (
        "{profile}Here are the items this user interacted with, oldest first:\n"
        "{history}\n\n"
        "Describe this user's preferences in a few sentences: what the items they like have in common, "
        "and what they seem to avoid."
    ),
}

ITEM_TEMPLATES = {
    "movies": (
        "Introduce the movie {title} in a few sentences: its genre, director and actors, time period and "
        "country, characters, plot and theme, mood and tone, critical acclaim, production quality and soundtrack."
    ),
    "beauty": (
        "Introduce the beauty product {title} in a few sentences: its brand, product type, ingredients or "
        "skin concern, price level, style and quality."
    ),
    "generic": "Describe the item {title} in a few sentences: what it is and who would like it.",
}

TEMPLATE_FIELDS = {"user": {"profile", "history"}, "item": {"title"}}


def domain_of(dataset: str) -> str:
    """Which template family a data set uses."""
    name = dataset.lower()
    if name.startswith("ml-") or "movie" in name:
        return "movies"
    if "beauty" in name or "amazon" in name:
        return "beauty"
    return "generic"


def check_template(template: str, kind: str, where: str) -> str:
    """Reject a template that uses fields we do not fill (before any work starts)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise InputError(f"{where}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(fields - TEMPLATE_FIELDS[kind])
    if unknown:
        raise InputError(f"{where}: unknown field {{{unknown[0]}}} (allowed: {', '.join(sorted(TEMPLATE_FIELDS[kind]))})")
    return template


def clean_text(text) -> str:
    """One line of printable text: newlines and control characters would let a title
    break the history's layout (and some byte sequences confuse tokenizers)."""
    text = "" if text is None else str(text)
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
