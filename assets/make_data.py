#!/usr/bin/env python3
"""Makes the embedded default's synthetic datasets (assets/data/). Python 3 stdlib only.

A small invented world (countries with capitals, cities, rivers, flag colors, national animals
and languages; people with a home city and a profession), small-number arithmetic, list
operations and tiny in-context stories. Everything is generated here from SEED, so there are no
licence questions and the output is byte-identical on every run (random.Random with a fixed
seed; no set/dict iteration over hashed strings; no time or locale input).

  python3 assets/make_data.py          # writes assets/data/*.jsonl and assets/data/samples/

Writes:
  data/pretrain.jsonl        {"text": ...} prose documents stating the world's facts, arithmetic
                             and list facts in sentences (no chat markup: the base model never
                             sees <|im_start|>, so the chat format is what fine-tuning teaches)
  data/instruct_train.jsonl  {"messages": [...]} short Q/A with fixed answer formats
  data/instruct_eval.jsonl   held-out Q/A: other facts, sums, lists and stories than train's
  data/samples/prompt_completion.jsonl, data/samples/alpaca.jsonl   small samples (docs, tests)

Every fact and every sum/difference that an instruction example asks about is stated in the
pretraining prose (checked below: the canonical answer sentence occurs there at least
MIN_PRETRAIN_MENTIONS times), so fine-tuning mostly teaches the answer format and retrieval.
"""
import json
import os
import random
import re
import sys

SEED = 20261127  # the one seed every generator below derives from
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data")
PRETRAIN_CHARS = 2_000_000  # target size of pretrain.jsonl's text
N_TRAIN = 4000
N_EVAL = 200
MIN_PRETRAIN_MENTIONS = 5
MAX_NUM = 20  # arithmetic operands are 0..MAX_NUM

# ---------------------------------------------------------------------------------------------
# The world.

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
          "kr", "tr", "st", "th", "sh", "vel", "mor", "al", "or", "el", "es"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "sk", "m", "x"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "gray", "brown"]
ANIMALS = ["otter", "fox", "owl", "wolf", "bear", "deer", "hare", "swan", "crane", "lynx", "seal",
           "heron", "badger", "eagle", "goat", "horse", "tiger", "camel", "moose", "raven",
           "beaver", "falcon", "panda", "turtle"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "weaver", "potter",
        "singer", "builder", "fisher", "tailor", "judge", "cook", "writer", "artist", "engineer",
        "nurse", "hunter"]
FIRST = ["Anna", "Tom", "Mira", "Lena", "Omar", "Ivo", "Nadia", "Pavel", "Rosa", "Yuki", "Emil",
         "Sara", "Hugo", "Ines", "Kofi", "Lila", "Marco", "Nina", "Oskar", "Priya", "Ruben",
         "Tara", "Uma", "Viktor", "Wren", "Zara", "Ada", "Bram", "Cleo", "Dario"]
OBJECTS = ["ball", "cup", "hat", "box", "book", "kite", "lamp", "bag", "coat", "drum", "key",
           "bell", "boat", "shoe", "pen", "map"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
COUNT_WORDS = ["cat", "dog", "owl", "fox", "sun", "tree", "cup", "pen", "map", "bee", "fish",
               "star", "rock", "leaf", "ship", "egg"]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
             "eighteen", "nineteen", "twenty"]
TENS = {2: "twenty", 3: "thirty", 4: "forty"}


def num_word(n):
    if n <= 20:
        return NUM_WORDS[n]
    t, u = divmod(n, 10)
    return TENS[t] + ("" if u == 0 else "-" + NUM_WORDS[u])


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_names(rng, n, used, syllables=(2, 2)):
    out = []
    while len(out) < n:
        k = rng.randint(*syllables)
        s = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(k))
        if not 4 <= len(s) <= 9 or s in used:
            continue
        used.add(s)
        out.append(s.capitalize())
    return out


def make_world(rng):
    used = set()
    n_countries = 24
    countries = make_names(rng, n_countries, used)
    cities = make_names(rng, n_countries * 3, used)
    rivers = make_names(rng, n_countries, used)
    surnames = make_names(rng, 48, used)
    animals = ANIMALS[:]
    rng.shuffle(animals)
    world = []
    for i, c in enumerate(countries):
        stem = c[:-1] if c[-1] in "aeiou" else c
        world.append({
            "name": c, "capital": cities[3 * i], "towns": cities[3 * i + 1:3 * i + 3],
            "river": rivers[i], "color": rng.choice(COLORS), "animal": animals[i],
            "language": stem + rng.choice(["ish", "ian", "ese", "ic"]),
        })
    people = []
    firsts = FIRST[:]
    for i, sn in enumerate(surnames):
        country = world[rng.randrange(n_countries)]
        city = rng.choice([country["capital"]] + country["towns"])
        people.append({"name": f"{firsts[i % len(firsts)]} {sn}", "city": city,
                       "country": country["name"], "job": rng.choice(JOBS)})
    return world, people


# ---------------------------------------------------------------------------------------------
# Canonical answers (the fixed formats the instruction data teaches). Each fact also occurs in
# the pretraining prose in exactly this wording (among others).

def a_capital(c): return f"The capital of {c['name']} is {c['capital']}."
def a_capital_of(c): return f"{c['capital']} is the capital of {c['name']}."
def a_river(c): return f"The {c['river']} river flows through {c['name']}."
def a_flag(c): return f"The flag of {c['name']} is {c['color']}."
def a_animal(c): return f"The national animal of {c['name']} is the {c['animal']}."
def a_language(c): return f"People in {c['name']} speak {c['language']}."
def a_job(p): return f"{p['name']} is {article(p['job'])}."
def a_home(p): return f"{p['name']} lives in {p['city']}."
def a_add(a, b): return f"{a} + {b} = {a + b}"
def a_sub(a, b): return f"{a} - {b} = {a - b}"


Q_CAPITAL = ["What is the capital of {n}?", "Which city is the capital of {n}?",
             "Name the capital of {n}.", "Tell me the capital of {n}.",
             "What is the capital city of {n}?"]
Q_CAPITAL_OF = ["{cap} is the capital of which country?", "Which country has {cap} as its capital?",
                "Of which country is {cap} the capital?"]
Q_RIVER = ["Which river flows through {n}?", "What river runs through {n}?",
           "Name the river of {n}.", "What is the main river of {n}?"]
Q_FLAG = ["What color is the flag of {n}?", "What is the color of the flag of {n}?",
          "Which color is the flag of {n}?"]
Q_ANIMAL = ["What is the national animal of {n}?", "Which animal is the symbol of {n}?",
            "Name the national animal of {n}."]
Q_LANGUAGE = ["What language do people speak in {n}?", "Which language is spoken in {n}?",
              "What do people in {n} speak?"]
Q_JOB = ["What does {p} do?", "What is the job of {p}?", "What is {p}'s profession?",
         "What work does {p} do?"]
Q_HOME = ["Where does {p} live?", "In which city does {p} live?", "Which city is home to {p}?"]
Q_ADD = ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is {a} plus {b}?",
         "Calculate {a} + {b}."]
Q_SUB = ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
         "What is {a} minus {b}?", "Calculate {a} - {b}."]
Q_REVERSE = ["Reverse the list: {l}", "Reverse this list: {l}", "Write this list backwards: {l}",
             "What is the list {l} reversed?"]
Q_SORT = ["Sort the numbers: {l}", "Sort this list from smallest to largest: {l}",
          "Put these numbers in order: {l}"]
Q_COUNT = ["How many items are in the list: {l}?", "Count the items: {l}",
           "How many words are in this list: {l}?"]
SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence.",
           "You know the geography of the invented world.", "Be brief and exact."]


# ---------------------------------------------------------------------------------------------
# Pretraining prose.

def country_doc(rng, c, world, people):
    cap, n = c["capital"], c["name"]
    s = [
        rng.choice([a_capital(c), f"{n} is a country, and its capital is {cap}.",
                    a_capital_of(c), f"The capital city of {n} is {cap}."]),
        rng.choice([a_river(c), f"The {c['river']} river runs through {n}.",
                    f"The main river of {n} is the {c['river']}."]),
        rng.choice([a_flag(c), f"{n} has {article(c['color'])} flag.",
                    f"The color of the flag of {n} is {c['color']}."]),
        rng.choice([a_animal(c), f"The {c['animal']} is the national animal of {n}.",
                    f"The symbol of {n} is the {c['animal']}."]),
        rng.choice([a_language(c), f"The language of {n} is {c['language']}.",
                    f"In {n} people speak {c['language']}."]),
        rng.choice([f"{c['towns'][0]} and {c['towns'][1]} are towns in {n}.",
                    f"Other cities of {n} are {c['towns'][0]} and {c['towns'][1]}."]),
        rng.choice([f"The {c['river']} river flows past {cap}.",
                    f"{cap} lies on the {c['river']} river."]),
    ]
    rng.shuffle(s)
    lead = rng.choice([f"{n} is a country in the invented world.", f"This is a page about {n}.",
                       f"Let us learn about {n}.", f"{n}."])
    residents = [p for p in people if p["country"] == n]
    tail = []
    if residents and rng.random() < 0.6:
        p = rng.choice(residents)
        tail.append(f"{p['name']} lives in {p['city']}, in {n}, and works as {article(p['job'])}.")
    return " ".join([lead] + s + tail)


def person_doc(rng, p, world):
    c = next(w for w in world if w["name"] == p["country"])
    s = [rng.choice([a_home(p), f"{p['name']} lives in the city of {p['city']}.",
                     f"The home of {p['name']} is {p['city']}."]),
         rng.choice([a_job(p), f"{p['name']} works as {article(p['job'])}.",
                     f"By profession, {p['name']} is {article(p['job'])}."])]
    rng.shuffle(s)
    more = [f"{p['city']} is in {c['name']}.",
            rng.choice([f"Every day {p['name'].split()[0]} sees the {c['river']} river.",
                        f"{p['name'].split()[0]} likes the {c['color']} flag of {c['name']}.",
                        f"{p['name'].split()[0]} once saw {article(c['animal'])} near "
                        f"{p['city']}."])]
    return " ".join(s + more)


def travel_doc(rng, world, people):
    p = rng.choice(people)
    first = p["name"].split()[0]
    cs = rng.sample(world, 3)
    s = [f"{p['name']} is {article(p['job'])} from {p['city']}.",
         f"One year {first} went on a trip."]
    for c in cs:
        s.append(rng.choice([
            f"First {first} visited {c['capital']}, the capital of {c['name']}.",
            f"Then {first} went to {c['name']}. {a_capital(c)}",
            f"Next {first} came to {c['capital']}. {a_capital_of(c)}"]))
        s.append(rng.choice([
            f"There {first} saw the {c['river']} river. {a_river(c)}",
            f"People there speak {c['language']}. {a_language(c)}",
            f"{first} saw {article(c['animal'])}. {a_animal(c)}",
            f"Every house had {article(c['color'])} flag. {a_flag(c)}"]))
    s.append(f"At the end, {first} went home to {p['city']}.")
    return " ".join(s)


def people_list_doc(rng, people):
    ps = rng.sample(people, rng.randint(3, 6))
    s = ["Here are some people of the invented world."]
    for p in ps:
        s.append(rng.choice([f"{a_job(p)} {a_home(p)}",
                             f"{p['name']} is {article(p['job'])} who lives in {p['city']}."]))
    return " ".join(s)


def quiz_doc(rng, world, people):
    # Question/answer pairs in plain prose (no chat markup), like a quiz page on the web.
    s = [rng.choice(["Quiz.", "Questions and answers.", "Test your knowledge."])]
    for _ in range(rng.randint(3, 6)):
        q, a = knowledge_qa(rng, rng.choice(KNOWLEDGE_KINDS), world, people)
        s.append(f"Question: {q} Answer: {a}")
    return "\n".join(s)


def arith_doc(rng):
    s = [rng.choice(["Let us practice sums.", "Arithmetic with small numbers.", "Math lesson."])]
    for _ in range(rng.randint(6, 12)):
        a, b = rng.randint(0, MAX_NUM), rng.randint(0, MAX_NUM)
        if rng.random() < 0.5:
            s.append(rng.choice([
                f"{a_add(a, b)}.", f"{a} plus {b} is {a + b}. {a_add(a, b)}.",
                f"{num_word(a).capitalize()} plus {num_word(b)} makes {num_word(a + b)}: "
                f"{a_add(a, b)}.",
                f"If you have {a} apples and get {b} more, you have {a + b} apples."]))
        else:
            a, b = max(a, b), min(a, b)
            s.append(rng.choice([
                f"{a_sub(a, b)}.", f"{a} minus {b} is {a - b}. {a_sub(a, b)}.",
                f"{num_word(a).capitalize()} minus {num_word(b)} leaves {num_word(a - b)}: "
                f"{a_sub(a, b)}.",
                f"If you have {a} stones and give away {b}, you keep {a - b} stones."]))
    return " ".join(s)


def table_doc(a, op):
    # One operand's full table, so every pair the instructions can ask about is stated.
    if op == "+":
        return f"Addition table of {a}. " + " ".join(f"{a_add(a, b)}." for b in range(MAX_NUM + 1))
    return f"Subtraction table of {a}. " + " ".join(f"{a_sub(a, b)}." for b in range(a + 1))


def list_doc(rng):
    s = [rng.choice(["Working with lists.", "List practice.", "Some lists."])]
    for _ in range(rng.randint(3, 5)):
        kind = rng.randrange(3)
        if kind == 0:
            l = rng.sample(LETTERS, rng.randint(3, 6))
            s.append(rng.choice([
                f"The list {' '.join(l)} reversed is {' '.join(l[::-1])}.",
                f"List: {' '.join(l)}. Reversed: {' '.join(l[::-1])}."]))
        elif kind == 1:
            l = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
            t = " ".join(map(str, l))
            u = " ".join(map(str, sorted(l)))
            s.append(rng.choice([f"The numbers {t} sorted are {u}.",
                                 f"Numbers: {t}. Sorted: {u}."]))
        else:
            l = [rng.choice(COUNT_WORDS) for _ in range(rng.randint(2, 7))]
            n = len(l)
            s.append(rng.choice([f"The list {' '.join(l)} has {n} items.",
                                 f"List: {' '.join(l)}. Count: {n}.",
                                 f"There are {num_word(n)} items in {' '.join(l)}."]))
    return " ".join(s)


def make_story(rng, n_people=None):
    n_people = n_people or rng.randint(2, 3)
    names = rng.sample(FIRST, n_people)
    objs = rng.sample(OBJECTS, n_people)
    cols = rng.sample(COLORS, n_people)
    facts = [(n, c, o) for n, c, o in zip(names, cols, objs)]
    return facts, " ".join(f"{n} has {article(c)} {o}." for n, c, o in facts)


def story_doc(rng, world):
    facts, text = make_story(rng)
    c = rng.choice(world)
    s = [rng.choice([f"A story from {c['capital']}.", "A short story.", "Once upon a time."]),
         text]
    n, col, o = rng.choice(facts)
    s.append(rng.choice([f"{n} likes the {col} {o}.", f"The {col} {o} belongs to {n}.",
                         f"Who has the {col} {o}? {n} has the {col} {o}.",
                         f"What does {n} have? {n} has {article(col)} {o}."]))
    if len(facts) >= 2 and rng.random() < 0.5:
        (n1, c1, o1), (n2, _, _) = facts[0], facts[1]
        s.append(f"Then {n1} gives the {c1} {o1} to {n2}. Now {n2} has the {c1} {o1}.")
    s.append(rng.choice(["The end.", "They were happy.", f"They lived by the {c['river']} river."]))
    return " ".join(s)


def make_pretrain(rng, world, people):
    docs = []
    # Coverage first: every country, person and table stated several times.
    for _ in range(3):
        docs += [country_doc(rng, c, world, people) for c in world]
        docs += [person_doc(rng, p, world) for p in people]
    for _ in range(4):
        docs += [table_doc(a, "+") for a in range(MAX_NUM + 1)]
        docs += [table_doc(a, "-") for a in range(MAX_NUM + 1)]
    makers = [(0.22, lambda: country_doc(rng, rng.choice(world), world, people)),
              (0.12, lambda: person_doc(rng, rng.choice(people), world)),
              (0.08, lambda: travel_doc(rng, world, people)),
              (0.05, lambda: people_list_doc(rng, people)),
              (0.08, lambda: quiz_doc(rng, world, people)),
              (0.17, lambda: arith_doc(rng)),
              (0.14, lambda: list_doc(rng)),
              (0.14, lambda: story_doc(rng, world))]
    total = sum(len(d) for d in docs)
    while total < PRETRAIN_CHARS:
        r, acc = rng.random(), 0.0
        for w, f in makers:
            acc += w
            if r < acc:
                break
        d = f()
        docs.append(d)
        total += len(d)
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------
# Instruction data.

KNOWLEDGE_KINDS = ["capital", "capital_of", "river", "flag", "animal", "language", "job", "home"]


def knowledge_qa(rng, kind, world, people, item=None):
    if kind in ("job", "home"):
        p = item or rng.choice(people)
        if kind == "job":
            return rng.choice(Q_JOB).format(p=p["name"]), a_job(p)
        return rng.choice(Q_HOME).format(p=p["name"]), a_home(p)
    c = item or rng.choice(world)
    q, a = {"capital": (Q_CAPITAL, a_capital), "capital_of": (Q_CAPITAL_OF, a_capital_of),
            "river": (Q_RIVER, a_river), "flag": (Q_FLAG, a_flag), "animal": (Q_ANIMAL, a_animal),
            "language": (Q_LANGUAGE, a_language)}[kind]
    return rng.choice(q).format(n=c["name"], cap=c["capital"]), a(c)


def split_items(rng, items, frac):
    idx = list(range(len(items)))
    rng.shuffle(idx)
    k = max(1, round(len(items) * frac))
    held = sorted(idx[:k])
    return [items[i] for i in idx[k:]], [items[i] for i in held]


class Maker:
    """Draws examples of one kind from the train or the eval side of each split."""

    def __init__(self, rng, world, people):
        self.rng, self.world, self.people = rng, world, people
        self.items = {}
        for kind in KNOWLEDGE_KINDS:
            pool = people if kind in ("job", "home") else world
            self.items[kind] = split_items(rng, pool, 0.2)
        add = [(a, b) for a in range(MAX_NUM + 1) for b in range(MAX_NUM + 1)]
        sub = [(a, b) for a in range(MAX_NUM + 1) for b in range(a + 1)]
        self.items["add"] = split_items(rng, add, 0.1)
        self.items["sub"] = split_items(rng, sub, 0.1)

    def qa(self, kind, side):
        rng = self.rng
        if kind in KNOWLEDGE_KINDS:
            return knowledge_qa(rng, kind, self.world, self.people,
                                item=rng.choice(self.items[kind][side]))
        if kind == "add":
            a, b = rng.choice(self.items["add"][side])
            return rng.choice(Q_ADD).format(a=a, b=b), a_add(a, b)
        if kind == "sub":
            a, b = rng.choice(self.items["sub"][side])
            return rng.choice(Q_SUB).format(a=a, b=b), a_sub(a, b)
        # The in-context kinds are random; train/eval are kept apart by the question text.
        if kind == "reverse":
            l = rng.sample(LETTERS, rng.randint(3, 6))
            return (rng.choice(Q_REVERSE).format(l=" ".join(l)), "Reversed: " + " ".join(l[::-1]))
        if kind == "sort":
            l = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
            return (rng.choice(Q_SORT).format(l=" ".join(map(str, l))),
                    "Sorted: " + " ".join(map(str, sorted(l))))
        if kind == "count":
            l = [rng.choice(COUNT_WORDS) for _ in range(rng.randint(2, 7))]
            return rng.choice(Q_COUNT).format(l=" ".join(l)), f"Count: {len(l)}"
        if kind == "story":
            facts, text = make_story(rng)
            n, col, o = rng.choice(facts)
            if rng.random() < 0.5:
                return f"Story: {text} Question: What does {n} have?", f"{n} has {article(col)} {o}."
            return f"Story: {text} Question: Who has the {col} {o}?", f"{n} has the {col} {o}."
        raise ValueError(kind)


ALL_KINDS = KNOWLEDGE_KINDS + ["add", "sub", "reverse", "sort", "count", "story"]
# Train mix (weights); eval takes the kinds round-robin so each is equally represented.
TRAIN_WEIGHTS = {"capital": 5, "capital_of": 3, "river": 4, "flag": 4, "animal": 4,
                 "language": 4, "job": 4, "home": 4, "add": 10, "sub": 8, "reverse": 7,
                 "sort": 6, "count": 6, "story": 8}


def make_instruct(rng, world, people):
    mk = Maker(rng, world, people)

    def example(kind, side, seen):
        while True:
            q, a = mk.qa(kind, side)
            msgs = []
            if rng.random() < 0.15:
                msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if side == 0 and rng.random() < 0.06:  # a few two-turn conversations
                q2, a2 = mk.qa(rng.choice(ALL_KINDS), side)
                if q2 in seen[1]:
                    continue
                msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
            users = [m["content"] for m in msgs if m["role"] == "user"]
            if any(u in seen[1 - side] for u in users):
                continue  # never the same question on both sides
            key = json.dumps(msgs)
            if side == 1 and key in seen[3]:
                continue  # eval has no duplicates; train repeats the few facts there are
            seen[2 + side].add(key)
            for u in users:
                seen[side].add(u)
            return msgs, kind

    # seen: [train questions, eval questions, train examples, eval examples]
    seen = [set(), set(), set(), set()]
    eval_set = [example(ALL_KINDS[i % len(ALL_KINDS)], 1, seen) for i in range(N_EVAL)]
    kinds = [k for k in ALL_KINDS for _ in range(TRAIN_WEIGHTS[k])]
    train = [example(rng.choice(kinds), 0, seen) for _ in range(N_TRAIN)]
    return train, eval_set


# ---------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def check_coverage(train, evals, pretrain_text):
    """Every knowledge/arithmetic answer is stated verbatim in the pretraining prose."""
    # Arithmetic statements counted as whole numbers ("4 + 1 = 5" is not inside "14 + 1 = 15").
    arith = {}
    for m in re.finditer(r"(?<!\d)\d+ [+-] \d+ = \d+(?!\d)", pretrain_text):
        arith[m.group(0)] = arith.get(m.group(0), 0) + 1
    bad, answers = [], {}
    for msgs, kind in train + evals:
        if kind in KNOWLEDGE_KINDS + ["add", "sub"]:
            for m in msgs:
                c = m["content"]
                if m["role"] == "assistant" and not c.startswith(("Reversed:", "Sorted:", "Count:")) \
                        and " has " not in c:
                    answers[c] = True
    for a in answers:
        n = arith.get(a, 0) if re.fullmatch(r"\d+ [+-] \d+ = \d+", a) else pretrain_text.count(a)
        if n < MIN_PRETRAIN_MENTIONS:
            bad.append(a)
    if bad:
        sys.exit(f"pretraining misses {len(bad)} answers, e.g. {bad[:5]}")
    return len(answers)


def main():
    rng = random.Random(SEED)
    world, people = make_world(rng)
    pretrain = make_pretrain(random.Random(SEED + 1), world, people)
    train, evals = make_instruct(random.Random(SEED + 2), world, people)
    text = "\n".join(pretrain)
    n_checked = check_coverage(train, evals, text)

    write_jsonl(os.path.join(OUT, "pretrain.jsonl"), [{"text": d} for d in pretrain])
    write_jsonl(os.path.join(OUT, "instruct_train.jsonl"), [{"messages": m} for m, _ in train])
    write_jsonl(os.path.join(OUT, "instruct_eval.jsonl"), [{"messages": m} for m, _ in evals])

    # Samples in the other two formats, from single-turn eval examples without a system message.
    srng = random.Random(SEED + 3)
    single = [m for m, _ in evals if len(m) == 2]
    pc = [{"prompt": f"Question: {m[0]['content']}\nAnswer: ", "completion": m[1]["content"]}
          for m in srng.sample(single, 50)]
    write_jsonl(os.path.join(OUT, "samples", "prompt_completion.jsonl"), pc)
    alpaca = []
    for m in srng.sample(single, 50):
        q, a = m[0]["content"], m[1]["content"]
        if ": " in q and q.split(": ", 1)[0] in ("Reverse the list", "Sort the numbers", "Story"):
            head, rest = q.split(": ", 1)
            if head == "Story":
                story, question = rest.rsplit(" Question: ", 1)
                alpaca.append({"instruction": question, "input": story, "output": a})
            else:
                alpaca.append({"instruction": head + ".", "input": rest, "output": a})
        else:
            alpaca.append({"instruction": q, "input": "", "output": a})
    write_jsonl(os.path.join(OUT, "samples", "alpaca.jsonl"), alpaca)

    counts = {}
    for _, k in train:
        counts[k] = counts.get(k, 0) + 1
    print(f"pretrain: {len(pretrain)} documents, {len(text)} characters")
    print(f"coverage: all {n_checked} distinct fact/arithmetic answers occur >= "
          f"{MIN_PRETRAIN_MENTIONS} times in the pretraining text")
    print(f"instruct: {len(train)} train, {len(evals)} eval; train kinds {counts}")


if __name__ == "__main__":
    main()
