"""A small, seeded, made-up world in English and Chinese: the data behind `tunelab demo`.

The world: 16 people, 8 towns and 5 rivers, all invented from syllables (English "Tavi Morrel", Chinese "林青禾").
Each person has a home town, a profession, a favourite colour, a pet and an age; each town has a region,
a river and a famous product. Every name and value has an English and a Chinese form, and both corpora
state the same facts. All text is written by the templates below; nothing comes from a third party.

`generate_demo_data(out_dir, seed, scale)` writes (sizes at scale 1.0; they scale linearly):
  pretrain/world_en.jsonl, world_zh.jsonl  {"text"} docs of 2-8 sentences, ~1.2 MB and ~0.4 MB of text
  instructions/train.jsonl, test.jsonl     Alpaca records with one short answer, ~1800 and ~200
  choice/{dev,test}/<subject>.csv          CMMLU/C-Eval layout, 5 dev and ~80 test questions per subject
  manifest.json                            seed, scale, and per-file record / character / byte counts
The same seed and scale give byte-identical files; the directory appears atomically when complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import DataError
from tunelab.io import atomic_dir

EN_BYTES, ZH_BYTES = 1_200_000, 400_000  # pretraining text per language at scale 1.0
N_TRAIN, N_TEST, N_CHOICE_TEST = 1800, 200, 80  # records at scale 1.0
MAX_SCALE = 10.0  # beyond this the instruction pools run out of distinct questions
N_PEOPLE, N_TOWNS, N_RIVERS = 16, 8, 5
AGES = range(20, 70)
LETTERS = "ABCD"
PERSON_KINDS = ("town", "profession", "colour", "pet", "age")
TOWN_KINDS = ("region", "river", "product")


@dataclass(frozen=True)
class Term:
    """One name or value in both languages, e.g. Term("red", "红色")."""

    en: str
    zh: str

    def text(self, lang: str) -> str:
        """The form in `lang` ("en" or "zh")."""
        return self.en if lang == "en" else self.zh


def _terms(pairs: str) -> tuple[Term, ...]:
    """Parse "red=红色 blue=蓝色" into Terms, so the vocabularies stay one line each."""
    return tuple(Term(*pair.split("=")) for pair in pairs.split())


PROFESSIONS = _terms("baker=面包师 potter=陶工 weaver=织工 fisher=渔夫 tailor=裁缝 carpenter=木匠 "
                     "farmer=农夫 doctor=医生 teacher=教师 miller=磨坊主 painter=画家 singer=歌手 "
                     "sailor=水手 builder=建筑工 gardener=园丁 cook=厨师")
COLOURS = _terms("red=红色 blue=蓝色 green=绿色 yellow=黄色 purple=紫色 white=白色 black=黑色 "
                 "orange=橙色 silver=银色 brown=棕色")
PETS = _terms("cat=猫 dog=狗 goat=山羊 parrot=鹦鹉 rabbit=兔子 tortoise=乌龟 hedgehog=刺猬 lamb=小羊 "
              "duck=鸭子 goose=鹅 hamster=仓鼠 canary=金丝雀")
PRODUCTS = _terms("cheese=奶酪 honey=蜂蜜 pottery=陶器 wool=羊毛 glass=玻璃 salt=盐 tea=茶叶 paper=纸 "
                  "rope=绳子 apples=苹果 silk=丝绸 candles=蜡烛 soap=肥皂 carpets=地毯")
REGIONS = _terms("north=北部 south=南部 east=东部 west=西部 centre=中部")

EN_GIVEN = "ta vi ke lo mi ra no si da fe ri sa be lu ne ko".split()
EN_FAMILY = ("Mor Hal Bren Cas Dur Fen Gar Lin Pell Ros Tam Wen".split(),
             "rel wick ton by mere dale ford ley ster ham".split())
EN_TOWN = ("Vel Ash Bram Cor Dun Elm Far Glen Hol Kin Lor Mar Ost Pen Quen Thorn".split(),
           "mora ford wick hollow stead ton brook moor haven field".split())
EN_RIVER = ("Se O Ta Ve Ilo Ka Mer Du".split(), "la run sa ne dra vin".split())
ZH_SURNAMES = "林王陈赵周吴孙郑何高罗梁宋唐许韩"
ZH_GIVEN = "青禾明雨云安宁晓文思月川子嘉若秋清一"
ZH_PLACE = "青石松竹花桥枫柳梅兰溪山湖月星霞玉金白碧"

# Statements: {s} is the subject, {v} the value. The first one per kind is the probe form (see
# fact_completion_pairs): its text before {v} must not start any other template.
STATEMENTS = {
    "en": {
        "town": ["{s} lives in {v}.", "{s} is from {v}.", "The home of {s} is {v}.",
                 "{s} grew up in {v} and still lives there.", "You can find {s} in the town of {v}.",
                 "{s} calls {v} home.", "Ask anyone in {v} and they will tell you that {s} lives there.",
                 "{s} has a small house in {v}.", "In {v} lives {s}."],
        "profession": ["{s} works as a {v}.", "{s} is a {v}.", "By trade, {s} is a {v}.",
                       "Everyone knows {s} as the {v}.", "{s} has worked as a {v} for many years.",
                       "{s} earns a living as a {v}.", "If you need a {v}, ask {s}.",
                       "{s}, a {v}, is well liked.", "The work of {s} is that of a {v}."],
        "colour": ["{s}'s favourite colour is {v}.", "The favourite colour of {s} is {v}.",
                   "{s} loves the colour {v}.", "{s} likes {v} more than any other colour.",
                   "Of all colours, {s} likes {v} best.", "{s} often wears {v}, the colour they like best.",
                   "{s} painted the front door {v}, a favourite colour.",
                   "Ask {s} about colours and the answer is always {v}."],
        "pet": ["{s} keeps a pet {v}.", "{s} has a {v} as a pet.", "The pet of {s} is a {v}.",
                "{s} owns a {v}.", "{s} lives with a pet {v}.", "Every morning {s} feeds a {v}.",
                "A {v} follows {s} everywhere.", "{s} takes good care of a pet {v}."],
        "age": ["The age of {s} is {v}.", "{s} is {v} years old.", "{s} turned {v} this year.",
                "At {v} years of age, {s} is still busy.", "{s} has lived for {v} years.",
                "{s}'s age is {v}.", "This year {s} is {v} years old.", "{s} is now {v}."],
        "region": ["{s} lies in the {v}.", "{s} is in the {v} of the land.",
                   "The town of {s} is found in the {v}.", "{s} is a town of the {v}.",
                   "Travel to the {v} and you will reach {s}.", "{s} sits in the {v} of the country.",
                   "On the map, {s} is in the {v}.", "People in the {v} know {s} well."],
        "river": ["{s} lies on the {v}.", "The {v} flows through {s}.", "{s} is built beside the {v}.",
                  "The river of {s} is the {v}.", "In {s}, boats sail on the {v}.",
                  "{s} stands on the banks of the {v}.", "Water for {s} comes from the {v}.",
                  "Follow the {v} and you will come to {s}."],
        "product": ["{s} is famous for its {v}.", "The famous product of {s} is {v}.",
                    "{s} makes the best {v} in the land.", "People travel to {s} to buy {v}.",
                    "{s} is known far and wide for {v}.", "The market of {s} is full of {v}.",
                    "Most families in {s} make {v}.", "When people think of {s}, they think of {v}."],
    },
    "zh": {
        "town": ["{s}住在{v}。", "{s}是{v}人。", "{s}的家在{v}。", "{s}在{v}长大，现在还住在那里。",
                 "在{v}可以找到{s}。", "{s}把{v}当作自己的家。", "问问{v}的人，他们都认识{s}。",
                 "{s}在{v}有一座小房子。"],
        "profession": ["{s}的职业是{v}。", "{s}是一名{v}。", "{s}靠做{v}为生。", "大家都知道{s}是{v}。",
                       "{s}当{v}已经很多年了。", "{s}的工作是{v}。", "如果需要{v}，可以去找{s}。",
                       "{s}是一位很受欢迎的{v}。"],
        "colour": ["{s}最喜欢的颜色是{v}。", "{s}喜欢{v}。", "在所有颜色里，{s}最喜欢{v}。",
                   "{s}常常穿{v}的衣服。", "{s}把门漆成了{v}。", "{s}最爱的颜色是{v}。",
                   "说到颜色，{s}总是选{v}。", "{s}的房间里到处都是{v}。"],
        "pet": ["{s}养了一只{v}。", "{s}的宠物是一只{v}。", "{s}家里有一只{v}。", "{s}每天早上都喂自己的{v}。",
                "{s}和一只{v}住在一起。", "{s}走到哪里，那只{v}就跟到哪里。", "{s}很会照顾那只{v}。",
                "{s}的{v}是全镇最乖的宠物。"],
        "age": ["{s}今年{v}岁。", "{s}{v}岁了。", "{s}的年龄是{v}岁。", "今年{s}已经{v}岁了。",
                "{s}已经活了{v}年。", "{s}刚满{v}岁。", "{v}岁的{s}仍然很忙。", "{s}的岁数是{v}。"],
        "region": ["{s}位于{v}。", "{s}在这片土地的{v}。", "{s}是{v}的一个小镇。", "去{v}就能到{s}。",
                   "在地图上，{s}在{v}。", "{v}的人都很熟悉{s}。", "{s}坐落在{v}。", "{s}属于{v}地区。"],
        "river": ["{s}靠近{v}。", "{v}流过{s}。", "{s}建在{v}旁边。", "{s}的河是{v}。", "在{s}，船在{v}上航行。",
                  "{s}坐落在{v}岸边。", "{s}的水来自{v}。", "沿着{v}走，就能到{s}。"],
        "product": ["{s}最有名的特产是{v}。", "{s}以{v}闻名。", "{s}出产这片土地上最好的{v}。",
                    "人们去{s}买{v}。", "{s}的{v}远近闻名。", "{s}的集市上到处都是{v}。",
                    "{s}的大多数人家都做{v}。", "一提到{s}，人们就想到{v}。"],
    },
}

# Stories combine one person's facts with their town's; every slot is filled with a true value.
STORIES = {
    "en": ["{name} the {profession} walked from {town} to the {river} with a pet {pet}.",
           "Dressed in {colour}, {name} carried a basket of {product} through the streets of {town}.",
           "At {age}, {name} still works every day as a {profession} in {town}.",
           "{name} and a {pet} sat by the {river}, far away in the {region}.",
           "The people of {town} often see {name}, the {profession}, wearing {colour}.",
           "Last spring {name} took a {pet} on a boat down the {river}."],
    "zh": ["{profession}{name}带着{pet}从{town}走到{river}边。",
           "穿着{colour}衣服的{name}提着一篮{product}走过{town}的街道。",
           "{age}岁的{name}每天还在{town}当{profession}。",
           "{name}和{pet}坐在{river}边，那里在这片土地的{region}。",
           "{town}的人常常看见{profession}{name}穿着{colour}的衣服。",
           "去年春天，{name}带着{pet}坐船顺着{river}而下。"],
}

# Questions with one short answer, shared by the instruction set and the multiple-choice files.
QUESTIONS = {
    "en": {
        "town": ["Where does {s} live?", "Which town is {s} from?", "What is the home town of {s}?",
                 "In which town does {s} live?"],
        "profession": ["What is {s}'s profession?", "What does {s} do for a living?",
                       "What is the job of {s}?", "What work does {s} do?"],
        "colour": ["What is {s}'s favourite colour?", "Which colour does {s} like best?",
                   "What colour does {s} love most?"],
        "pet": ["What pet does {s} keep?", "What animal does {s} have as a pet?",
                "What kind of pet does {s} own?"],
        "age": ["How old is {s}?", "What is the age of {s}?", "How many years old is {s}?"],
        "region": ["In which region is {s}?", "Which part of the land is {s} in?",
                   "In which part of the country does {s} lie?"],
        "river": ["Which river flows through {s}?", "On which river does {s} lie?",
                  "What river is {s} built beside?"],
        "product": ["What is {s} famous for?", "What is the famous product of {s}?",
                    "What do people travel to {s} to buy?"],
    },
    "zh": {
        "town": ["{s}住在哪个镇？", "{s}的家乡是哪里？", "{s}是哪个镇的人？"],
        "profession": ["{s}的职业是什么？", "{s}是做什么工作的？", "{s}靠什么为生？"],
        "colour": ["{s}最喜欢什么颜色？", "{s}最喜欢的颜色是哪一种？"],
        "pet": ["{s}养的宠物是什么？", "{s}养了什么动物？"],
        "age": ["{s}今年多少岁？", "{s}的年龄是多少？"],
        "region": ["{s}位于哪个地区？", "{s}在这片土地的哪个部分？", "{s}属于哪个地区？"],
        "river": ["哪条河流过{s}？", "{s}靠近哪条河？", "{s}建在哪条河旁边？"],
        "product": ["{s}最有名的特产是什么？", "{s}以什么闻名？", "人们去{s}主要买什么？"],
    },
}
BRIEFLY = {"en": "Answer briefly: {q}", "zh": "请简短回答：{q}"}
ARITHMETIC = {"en": ["What is {a} {op} {b}?", "Calculate {a} {op} {b}."],
              "zh": ["{a} {op} {b} 等于多少？", "计算：{a} {op} {b}"]}
STRING_OPS = {  # name: (English question, Chinese question, answer)
    "reverse": ('Reverse the word "{w}".', "把单词“{w}”倒过来写。", lambda w: w[::-1]),
    "upper": ('Write the word "{w}" in capital letters.', "把单词“{w}”写成大写字母。", str.upper),
    "length": ('How many letters are in the word "{w}"?', "单词“{w}”有几个字母？", lambda w: str(len(w))),
    "first": ('What is the first letter of the word "{w}"?', "单词“{w}”的第一个字母是什么？", lambda w: w[0]),
    "last": ('What is the last letter of the word "{w}"?', "单词“{w}”的最后一个字母是什么？", lambda w: w[-1]),
}
EXTRA_WORDS = ("river town bread stone lamp cloud garden window market bridge forest summer winter morning "
               "letter number pencil basket ladder mirror pillow button ribbon kettle").split()
SUBJECTS = {"world_people": ("zh", PERSON_KINDS), "world_towns": ("zh", TOWN_KINDS),
            "world_english": ("en", PERSON_KINDS + TOWN_KINDS)}


@dataclass(frozen=True)
class Fact:
    """One statement of the world: `subject`'s `kind` is `value`."""

    subject: Term
    kind: str
    value: Term


@dataclass(frozen=True)
class Person:
    """One inhabitant; `town` is the name of their home town."""

    name: Term
    town: Term
    profession: Term
    colour: Term
    pet: Term
    age: int


@dataclass(frozen=True)
class Town:
    """One town, lying in a region on a river, famous for one product."""

    name: Term
    region: Term
    river: Term
    product: Term


@dataclass(frozen=True)
class World:
    """The people, towns and rivers made from one seed."""

    seed: int
    people: tuple[Person, ...]
    towns: tuple[Town, ...]
    rivers: tuple[Term, ...]

    def person_facts(self, p: Person) -> list[Fact]:
        """The five facts about one person, in PERSON_KINDS order."""
        age = Term(str(p.age), str(p.age))
        values = (p.town, p.profession, p.colour, p.pet, age)
        return [Fact(p.name, k, v) for k, v in zip(PERSON_KINDS, values)]

    def town_facts(self, t: Town) -> list[Fact]:
        """The three facts about one town, in TOWN_KINDS order."""
        return [Fact(t.name, k, v) for k, v in zip(TOWN_KINDS, (t.region, t.river, t.product))]

    def facts(self) -> list[Fact]:
        """Every fact of the world: people first, then towns."""
        return [f for p in self.people for f in self.person_facts(p)] + [
            f for t in self.towns for f in self.town_facts(t)]

    def town(self, name: Term) -> Town:
        """The town called `name`."""
        return next(t for t in self.towns if t.name == name)

    def values(self, kind: str) -> list[Term]:
        """Every valid value of one attribute, in a fixed order: the distractors for a question."""
        fixed = {"profession": PROFESSIONS, "colour": COLOURS, "pet": PETS, "product": PRODUCTS,
                 "region": REGIONS, "river": self.rivers, "town": tuple(t.name for t in self.towns)}
        return list(fixed[kind]) if kind in fixed else [Term(str(a), str(a)) for a in AGES]


def _unique(rng: random.Random, make: Callable[[random.Random], str], n: int) -> list[str]:
    """Call make(rng) until it has given n distinct strings; keeps the order they came in."""
    out: list[str] = []
    while len(out) < n:
        name = make(rng)
        if name not in out:
            out.append(name)
    return out


def load_world(seed: int = 0) -> World:
    """Build the world for `seed`; only random.Random(seed) decides, so every run agrees."""
    rng = random.Random(seed)
    en_people = _unique(rng, lambda r: "".join(r.sample(EN_GIVEN, 2)).capitalize() + " "
                        + r.choice(EN_FAMILY[0]) + r.choice(EN_FAMILY[1]), N_PEOPLE)
    zh_people = _unique(rng, lambda r: r.choice(ZH_SURNAMES) + "".join(r.sample(ZH_GIVEN, 2)), N_PEOPLE)
    en_towns = _unique(rng, lambda r: r.choice(EN_TOWN[0]) + r.choice(EN_TOWN[1]), N_TOWNS)
    zh_towns = _unique(rng, lambda r: "".join(r.sample(ZH_PLACE, 2)) + "镇", N_TOWNS)
    en_rivers = _unique(rng, lambda r: r.choice(EN_RIVER[0]) + r.choice(EN_RIVER[1]) + " River", N_RIVERS)
    zh_rivers = _unique(rng, lambda r: "".join(r.sample(ZH_PLACE, 2)) + "河", N_RIVERS)
    rivers = tuple(Term(e, z) for e, z in zip(en_rivers, zh_rivers))
    products = rng.sample(PRODUCTS, N_TOWNS)
    towns = tuple(Town(Term(e, z), rng.choice(REGIONS), rng.choice(rivers), product)
                  for e, z, product in zip(en_towns, zh_towns, products))
    homes = [t.name for t in towns] * math.ceil(N_PEOPLE / N_TOWNS)  # every town has residents
    rng.shuffle(homes)
    people = tuple(Person(Term(e, z), home, rng.choice(PROFESSIONS), rng.choice(COLOURS), rng.choice(PETS),
                          rng.choice(AGES)) for e, z, home in zip(en_people, zh_people, homes))
    return World(seed, people, towns, rivers)


def _say(fact: Fact, lang: str, rng: random.Random) -> str:
    """One sentence stating `fact`; the probe form is favoured so the demo's probes are learnable."""
    templates = STATEMENTS[lang][fact.kind]
    template = templates[0] if rng.random() < 0.25 else rng.choice(templates)
    return template.format(s=fact.subject.text(lang), v=fact.value.text(lang))


def _story(world: World, p: Person, lang: str, rng: random.Random) -> str:
    """A filler sentence that weaves several true facts about a person and their town together."""
    town = world.town(p.town)
    slots = {"name": p.name, "town": p.town, "profession": p.profession, "colour": p.colour, "pet": p.pet,
             "age": Term(str(p.age), str(p.age)), "river": town.river, "product": town.product,
             "region": town.region}
    return rng.choice(STORIES[lang]).format(**{k: v.text(lang) for k, v in slots.items()})


def _document(world: World, lang: str, rng: random.Random) -> str:
    """A short document (2-8 sentences) about a person, a town, or a person and their town."""
    person, town = rng.choice(world.people), rng.choice(world.towns)
    kind = rng.choices(["person", "town", "both"], weights=[5, 2, 3])[0]
    facts: list[Fact] = []
    if kind in ("person", "both"):
        n_facts = rng.randint(2, 5) if kind == "person" else rng.randint(1, 4)
        facts += rng.sample(world.person_facts(person), n_facts)
    if kind == "both":
        facts += rng.sample(world.town_facts(world.town(person.town)), rng.randint(1, 3))
    if kind == "town":
        residents = [p for p in world.people if p.town == town.name]
        facts += rng.sample(world.town_facts(town), rng.randint(2, 3))
        facts += [Fact(p.name, "town", town.name) for p in residents if rng.random() < 0.5]
    sentences = [_say(f, lang, rng) for f in facts]
    if kind != "town" and rng.random() < 0.5:
        sentences.append(_story(world, person, lang, rng))
    rng.shuffle(sentences)
    return (" " if lang == "en" else "").join(sentences)


def _corpus(world: World, lang: str, n_bytes: int, rng: random.Random) -> list[dict]:
    """Documents until their UTF-8 text reaches `n_bytes`, so the size is linear in scale."""
    docs, size = [], 0
    while size < n_bytes:
        text = _document(world, lang, rng)
        docs.append({"text": text})
        size += len(text.encode("utf-8"))
    return docs


def _record(question: str, answer: str, task: str, lang: str) -> dict:
    """An Alpaca record with one short, checkable answer."""
    return {"instruction": question, "input": "", "output": answer, "task": task, "lang": lang}


def _with_variants(question: str, answer: str, task: str, lang: str) -> list[dict]:
    """The question as asked, and asked for a brief answer: two distinct instructions, one answer."""
    return [_record(q, answer, task, lang) for q in (question, BRIEFLY[lang].format(q=question))]


def _fact_tasks(world: World) -> list[dict]:
    """Every question about every fact, in both languages."""
    return [r for f in world.facts() for lang in ("en", "zh") for q in QUESTIONS[lang][f.kind]
            for r in _with_variants(q.format(s=f.subject.text(lang)), f.value.text(lang), "fact", lang)]


def _string_tasks() -> list[dict]:
    """Every string operation on every word of the world's English vocabulary, in both languages."""
    vocab = [t.en for t in PROFESSIONS + COLOURS + PETS + PRODUCTS] + list(EXTRA_WORDS)
    words = sorted(set(vocab))
    return [r for w in words for en, zh, answer in STRING_OPS.values() for lang, q in (("en", en), ("zh", zh))
            for r in _with_variants(q.format(w=w), answer(w), "string", lang)]


def _arithmetic_task(rng: random.Random) -> dict:
    """One random sum, difference (never negative) or small product, answered with just the number."""
    op = rng.choice("+-×")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(0, 99), rng.randint(0, 99))
    if op == "-" and a < b:
        a, b = b, a
    answer = {"+": a + b, "-": a - b, "×": a * b}[op]
    lang = rng.choice(("en", "zh"))
    question = rng.choice(ARITHMETIC[lang]).format(a=a, op=op, b=b)
    if rng.random() < 0.5:
        question = BRIEFLY[lang].format(q=question)
    return _record(question, str(answer), "arithmetic", lang)


def _small_arithmetic_tasks() -> list[dict]:
    """Every one-digit sum, difference (never negative) and product, each asked four ways in each language."""
    sums = [(a, "+", b, a + b) for a in range(10) for b in range(10)]
    differences = [(a, "-", b, a - b) for a in range(10) for b in range(a + 1)]
    products = [(a, "×", b, a * b) for a in range(2, 10) for b in range(2, 10)]
    return [r for a, op, b, answer in sums + differences + products for lang in ("en", "zh") for q in ARITHMETIC[lang]
            for r in _with_variants(q.format(a=a, op=op, b=b), str(answer), "arithmetic", lang)]


def _instructions(world: World, n_total: int, rng: random.Random) -> list[dict]:
    """`n_total` distinct records, shuffled: ~60% fact, ~15% string, ~25% one-digit arithmetic.

    The mix is what the tiny demo model can learn in a minute of fine-tuning: questions about facts it
    read in pretraining, and a small arithmetic table. Beyond these pools (large scales), records are
    arithmetic on two-digit numbers.
    """
    facts, strings, small = _fact_tasks(world), _string_tasks(), _small_arithmetic_tasks()
    for pool in (facts, strings, small):
        rng.shuffle(pool)
    records = facts[: round(0.6 * n_total)] + strings[: round(0.15 * n_total)]
    records += small[: n_total - len(records)]
    seen = {(r["instruction"], r["input"]) for r in records}
    while len(records) < n_total:
        record = _arithmetic_task(rng)
        if (record["instruction"], record["input"]) not in seen:
            seen.add((record["instruction"], record["input"]))
            records.append(record)
    rng.shuffle(records)
    return records


def _choice_rows(items: list[tuple[Fact, str]], world: World, lang: str, rng: random.Random) -> list[list]:
    """CMMLU rows [index, question, A, B, C, D, answer]; answer letters balanced, distractors of one kind."""
    letters = [LETTERS[i % 4] for i in range(len(items))]
    rng.shuffle(letters)
    rows = []
    for i, ((fact, question), letter) in enumerate(zip(items, letters)):
        options = rng.sample([v for v in world.values(fact.kind) if v != fact.value], 3)
        options.insert(LETTERS.index(letter), fact.value)
        rows.append([i, question.format(s=fact.subject.text(lang)), *(o.text(lang) for o in options), letter])
    return rows


def _choice_subject(world: World, lang: str, kinds: tuple[str, ...], n_test: int,
                    rng: random.Random) -> tuple[list[list], list[list]]:
    """Dev (5 facts) and test rows for one subject; test never asks about a dev fact."""
    facts = [f for f in world.facts() if f.kind in kinds]
    rng.shuffle(facts)
    dev = [(f, rng.choice(QUESTIONS[lang][f.kind])) for f in facts[:5]]
    pool = [(f, q) for f in facts[5:] for q in QUESTIONS[lang][f.kind]]
    rng.shuffle(pool)
    return _choice_rows(dev, world, lang, rng), _choice_rows(pool[:n_test], world, lang, rng)


def _csv_text(rows: list[list]) -> str:
    """The CMMLU/C-Eval CSV layout: header `,Question,A,B,C,D,Answer`, "\\n" line endings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
    writer.writerows(rows)
    return buffer.getvalue()


def _jsonl_text(records: list[dict]) -> str:
    """One JSON object per line, Chinese kept readable."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _check_args(seed: int, scale: float) -> None:
    """Reject arguments a user can get wrong, saying how to fix them."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"demo data seed must be an integer, got {seed!r}; pass e.g. seed=0")
    if not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SCALE or not math.isfinite(scale):
        raise DataError(f"demo data scale must be a number in (0, {MAX_SCALE}], got {scale!r}; "
                        "use 1.0 for the standard size or e.g. 0.05 for a quick test")


def _build_files(seed: int, scale: float) -> dict[str, str]:
    """Every output file's relative path and text, in a fixed order."""
    world = load_world(seed)
    files = {}
    for lang, size in (("en", EN_BYTES), ("zh", ZH_BYTES)):
        docs = _corpus(world, lang, round(size * scale), random.Random(f"{seed}:{lang}"))
        files[f"pretrain/world_{lang}.jsonl"] = _jsonl_text(docs)
    n_train, n_test = max(60, round(N_TRAIN * scale)), max(30, round(N_TEST * scale))
    records = _instructions(world, n_train + n_test, random.Random(f"{seed}:instructions"))
    files["instructions/train.jsonl"] = _jsonl_text(records[n_test:])
    files["instructions/test.jsonl"] = _jsonl_text(records[:n_test])
    n_choice = max(10, round(N_CHOICE_TEST * scale))
    for subject, (lang, kinds) in SUBJECTS.items():
        dev, test = _choice_subject(world, lang, kinds, n_choice, random.Random(f"{seed}:{subject}"))
        files[f"choice/dev/{subject}.csv"] = _csv_text(dev)
        files[f"choice/test/{subject}.csv"] = _csv_text(test)
    return files


def _manifest(seed: int, scale: float, files: dict[str, str]) -> dict:
    """Seed, scale and, per file, its record count (lines or CSV rows), characters and UTF-8 bytes."""
    entries = [{"path": path, "records": text.count("\n") - path.endswith(".csv"), "chars": len(text),
                "bytes": len(text.encode("utf-8"))} for path, text in files.items()]
    return {"seed": seed, "scale": scale, "people": N_PEOPLE, "towns": N_TOWNS, "files": entries}


def generate_demo_data(out_dir: str | Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Write the demo world's corpora, instructions and multiple-choice files; return the manifest.

    The directory is built beside `out_dir` and renamed into place, so it is complete or absent.
    """
    _check_args(seed, scale)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"demo data output {out} exists and is not a directory; remove it or pick another")
    files = _build_files(seed, scale)
    manifest = _manifest(seed, scale, files)
    files["manifest.json"] = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    try:
        with atomic_dir(out, kind="demo data directory") as tmp:
            for path, text in files.items():
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(text.encode("utf-8"))
    except OSError as e:
        raise DataError(f"cannot write demo data to {out}: {e}; choose a writable directory") from e
    return manifest


def fact_completion_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, expected continuation) for every fact, English and Chinese interleaved in a seeded order.

    A prompt is the probe statement cut before the value, e.g. ("Tavi Morrel works as a", "baker") or
    ("林青禾的职业是", "面包师"); in English the continuation follows after one space.
    """
    world, rng = load_world(seed), random.Random(f"{seed}:probes")
    by_lang = {}
    for lang in ("en", "zh"):
        pairs = []
        for f in world.facts():
            prefix = STATEMENTS[lang][f.kind][0].split("{v}")[0].rstrip()
            pairs.append((prefix.format(s=f.subject.text(lang)), f.value.text(lang)))
        rng.shuffle(pairs)
        by_lang[lang] = pairs
    return [pair for en_zh in zip(by_lang["en"], by_lang["zh"]) for pair in en_zh]


def sample_prompts(seed: int = 0, n: int = 4) -> list[str]:
    """The first `n` probe prompts (English and Chinese alternating), completed before and after training.

    They are the prompts of fact_completion_pairs(seed)[:n], which also gives the expected answers.
    """
    return [prompt for prompt, _ in fact_completion_pairs(seed)[:n]]
