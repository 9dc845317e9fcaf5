"""A built-in pair of prompt sets for `routesae diff`: the same questions, asked once as a novice
would want them answered and once as an expert would (the prompt-style comparison of the Goodfire
SAE study), so the README can show a diff offline. Line i of one set pairs with line i of the other."""

from __future__ import annotations

TOPICS = [
    "how a hash table finds a key",
    "what a Python decorator does",
    "why floating-point numbers round",
    "how garbage collection frees memory",
    "what a database index is for",
    "how TCP makes delivery reliable",
    "what recursion is",
    "how a compiler turns code into machine instructions",
    "what a mutex protects against",
    "how public-key encryption works",
    "what a virtual machine is",
    "how a regular expression matches text",
    "why sorting takes n log n comparisons",
    "what an operating system kernel does",
    "how a neural network learns from data",
    "what a Git merge conflict is",
]

NOVICE = [f"Explain to a complete beginner, in simple words and with an everyday example, {t}." for t in TOPICS]
EXPERT = [f"For an expert audience, give a precise technical account, with the relevant trade-offs, of {t}."
          for t in TOPICS]

SETS = {"builtin:novice": NOVICE, "builtin:expert": EXPERT}
"""The names `routesae diff --a/--b` accepts besides files."""
