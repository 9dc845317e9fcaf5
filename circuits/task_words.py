"""Word lists and templates for the circuit task generators. Plain Python data: the generators
filter them by the model's tokenizer at generation time (a pair whose prompts differ in token
length, or whose answers are not single tokens, is dropped and counted), so these lists need not
be tuned to one tokenizer."""

from __future__ import annotations

# (singular, plural): common nouns most BPE vocabularies hold as one token with a leading space.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("dog", "dogs"), ("cat", "cats"), ("friend", "friends"), ("teacher", "teachers"),
    ("doctor", "doctors"), ("student", "students"), ("author", "authors"), ("farmer", "farmers"),
    ("father", "fathers"), ("mother", "mothers"), ("girl", "girls"), ("boy", "boys"), ("car", "cars"),
    ("book", "books"), ("house", "houses"), ("tree", "trees"), ("bird", "birds"), ("player", "players"),
    ("singer", "singers"), ("writer", "writers"), ("worker", "workers"), ("officer", "officers"),
    ("manager", "managers"), ("lawyer", "lawyers"), ("artist", "artists"), ("nurse", "nurses"),
    ("pilot", "pilots"), ("driver", "drivers"), ("chef", "chefs"), ("parent", "parents"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("window", "windows"), ("computer", "computers"),
    ("neighbor", "neighbors"), ("soldier", "soldiers"), ("leader", "leaders"), ("guest", "guests"),
)

# Nouns for the prepositional attractor ("The keys to the cabinet"): (singular, plural).
ATTRACTORS: tuple[tuple[str, str], ...] = (
    ("cabinet", "cabinets"), ("desk", "desks"), ("door", "doors"), ("table", "tables"), ("school", "schools"),
    ("building", "buildings"), ("river", "rivers"), ("station", "stations"), ("office", "offices"),
    ("garden", "gardens"), ("church", "churches"), ("hospital", "hospitals"), ("bridge", "bridges"),
    ("museum", "museums"), ("box", "boxes"), ("car", "cars"), ("window", "windows"), ("room", "rooms"),
)

PREPOSITIONS: tuple[str, ...] = ("near", "behind", "beside", "by", "to", "from", "in", "at")

# (singular verb, plural verb): the answers of the agreement templates.
VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))

# Past-tense transitive verbs that end a relative clause without agreeing ("The keys that the man found").
RC_VERBS: tuple[str, ...] = ("saw", "liked", "found", "knew", "met", "helped", "called", "loved", "visited", "found")

# Present-tense verbs that agree inside a relative clause ("The dog that the boys" -> " like").
RC_AGREE_VERBS: tuple[tuple[str, str], ...] = (("likes", "like"), ("sees", "see"), ("knows", "know"),
                                              ("loves", "love"), ("helps", "help"), ("hates", "hate"))

# SVA templates: {subj} carries the number the answer agrees with; {attr} / {other} do not.
# kind: "simple" (no attractor), "pp" (prepositional attractor), "rc" (across a relative clause),
# "within_rc" (the verb inside a relative clause agrees with its subject {subj}).
SVA_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("simple", "The {subj}"),
    ("simple", "I think the {subj}"),
    ("simple", "Yesterday the {subj}"),
    ("pp", "The {subj} {prep} the {attr}"),
    ("pp", "I think the {subj} {prep} the {attr}"),
    ("rc", "The {subj} that the {other} {rcverb}"),
    ("rc", "The {subj} who the {other} {rcverb}"),
    ("within_rc", "The {other} that the {subj}"),
)

# Short first names, mostly single tokens with a leading space.
NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Anna", "David", "Sarah", "Michael", "Emma", "Paul", "Lisa", "Mark",
    "Kate", "Peter", "Alice", "Bob", "Jack", "Laura", "Chris", "Linda", "Steve", "Susan", "Kevin", "Amy",
    "Daniel", "Rachel", "Robert", "Helen", "George", "Grace",
)

PLACES: tuple[str, ...] = ("store", "park", "school", "office", "restaurant", "hospital", "beach", "library",
                           "garden", "station", "market", "museum")
OBJECTS: tuple[str, ...] = ("book", "ball", "drink", "letter", "ring", "bone", "computer", "kiss", "gift",
                            "flower", "basket", "phone")

# IOI templates: {a} and {b} are introduced; {s} (the subject, repeated) gives to the other name.
IOI_TEMPLATES: tuple[str, ...] = (
    "Then, {a} and {b} went to the {place}. {s} gave a {obj} to",
    "Then, {a} and {b} had a lot of fun at the {place}. {s} gave a {obj} to",
    "When {a} and {b} got a {obj} at the {place}, {s} decided to give it to",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to",
    "While {a} and {b} were working at the {place}, {s} gave a {obj} to",
    "Friends {a} and {b} found a {obj} at the {place}. {s} gave it to",
)

# Variable names of the Python REPL transcripts.
VARIABLES: tuple[str, ...] = ("x", "a", "b", "d", "data", "nums", "vals", "items", "lst", "arr", "scores", "ages")

# Dictionary keys: short common words.
KEYS: tuple[str, ...] = ("apple", "cat", "dog", "red", "blue", "green", "car", "tree", "sun", "moon", "box",
                         "pen", "cup", "key", "map", "egg", "fish", "bird", "star", "rose", "milk", "tea")

# REPL templates; the prompt ends with the newline after the expression, so the answer is the
# first token of the interpreter's reply.
LIST_TEMPLATES: tuple[str, ...] = (
    ">>> {var} = [{items}]\n>>> {var}[{idx}]\n",
    ">>> {var} = [{items}]\n>>> print({var}[{idx}])\n",
)
DICT_TEMPLATES: tuple[str, ...] = (
    ">>> {var} = {{{items}}}\n>>> {var}['{key}']\n",
    ">>> {var} = {{{items}}}\n>>> print({var}['{key}'])\n",
)

# What the interpreter prints first for a missing key or index; the answer is its first token.
ERROR_REPLY = "Traceback"
