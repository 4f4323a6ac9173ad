"""The `sql` demo task: a small English-to-SQL template grammar, and a parser for its SQL.

    request   := VERB " all " TABLE [COND] [SORT]
               | VERB " " ["the "] COLS " of " TABLE [COND] [SORT]
               | ("count " | "how many ") TABLE [COND]
    VERB      := "show" | "list"
    COLS      := PLURAL | PLURAL " and " PLURAL
    COND      := " with " NUMCOL (" above " | " below " | " equal to ") NUMBER
               | " older than " NUMBER | " younger than " NUMBER        (users only)
               | (" from " | " in ") CITY                               (users only)
    SORT      := " sorted by " COL
    NUMBER    := 1 to 999
    CITY      := one lowercase word (any: it is copied into the query)

    "show names of users older than 30"     ->  SELECT name FROM users WHERE age > 30;
    "count orders with total above 250"     ->  SELECT COUNT(*) FROM orders WHERE total > 250;
    "list the emails of users in berlin"    ->  SELECT email FROM users WHERE city = 'berlin';
    "how many products with price below 5"  ->  SELECT COUNT(*) FROM products WHERE price < 5;

Every answer is a query of one family, which `parse_sql` recognises:

    SELECT (* | COUNT(*) | COL [, COL]) FROM TABLE [WHERE COL (> | < | =) NUMBER | WHERE city = 'WORD']
        [ORDER BY COL];          (no ORDER BY after COUNT(*); every COL belongs to TABLE)
"""

from __future__ import annotations

import random
import re
import string

# table -> {column: plural used in requests}
TABLES: dict[str, dict[str, str]] = {
    "users": {"name": "names", "age": "ages", "city": "cities", "email": "emails"},
    "orders": {"id": "ids", "total": "totals", "status": "statuses"},
    "products": {"name": "names", "price": "prices", "stock": "stocks", "category": "categories"},
}
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("age",), "orders": ("id", "total"), "products": ("price", "stock"),
}
COMPARISONS = {"above": ">", "below": "<", "equal to": "="}
CITIES = ("paris", "london", "tokyo", "lima", "oslo", "cairo", "delhi", "rome", "berlin", "madrid",
          "sydney", "toronto", "seoul", "dublin", "vienna", "prague")
VERBS = ("show", "list")
# The answer to an input that is no question of the grammar at all.
FALLBACK_QUERY = "SELECT * FROM users;"
# Questions a newcomer asks that the grammar does not cover: the answer is still a
# well-formed query of the family (tests/test_demo_accuracy.py checks), not a meaningful one.
OFF_GRAMMAR_QUESTIONS = (
    "list the emails of customers in berlin",
    "what is the weather in paris?",
    "delete all users",
    "How many orders were shipped today?",
    "show me everything",
    "SELECT * FROM users;",
    "which products are out of stock",
    "average price of products",
    "names of users",
    "show users where age is 30",
)
COUNT_PHRASES = ("count", "how many")


def _city(rng: random.Random) -> str:
    # Random words too, so the model learns to copy the city rather than pick from a list.
    if rng.random() < 0.5:
        return rng.choice(CITIES)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))


def _condition(rng: random.Random, table: str) -> tuple[str, str]:
    """(request phrase, SQL clause); both empty when there is no condition."""
    kind = rng.random()
    if kind < 0.2:
        return "", ""
    number = str(rng.randint(1, 999) if rng.random() < 0.5 else rng.randint(1, 99))
    if table == "users" and kind < 0.4:
        return " older than " + number, " WHERE age > " + number
    if table == "users" and kind < 0.5:
        return " younger than " + number, " WHERE age < " + number
    if table == "users" and kind < 0.75:
        city = _city(rng)
        return f" {rng.choice(('from', 'in'))} {city}", f" WHERE city = '{city}'"
    column = rng.choice(NUMERIC_COLUMNS[table])
    phrase = rng.choice(tuple(COMPARISONS))
    return f" with {column} {phrase} {number}", f" WHERE {column} {COMPARISONS[phrase]} {number}"


def _sort(rng: random.Random, table: str) -> tuple[str, str]:
    if rng.random() < 0.7:
        return "", ""
    column = rng.choice(tuple(TABLES[table]))
    return " sorted by " + column, " ORDER BY " + column


def random_sql_pair(rng: random.Random) -> tuple[str, str]:
    """One (request, SQL) pair drawn from the grammar above."""
    table = rng.choice(tuple(TABLES))
    condition, where = _condition(rng, table)
    form = rng.random()
    if form < 0.2:
        return f"{rng.choice(COUNT_PHRASES)} {table}{condition}", f"SELECT COUNT(*) FROM {table}{where};"
    sort, order_by = _sort(rng, table)
    verb = rng.choice(VERBS)
    if form < 0.4:
        return f"{verb} all {table}{condition}{sort}", f"SELECT * FROM {table}{where}{order_by};"
    columns = rng.sample(tuple(TABLES[table]), rng.choice((1, 1, 2)))
    plurals = " and ".join(TABLES[table][c] for c in columns)
    article = "the " if rng.random() < 0.3 else ""
    return (f"{verb} {article}{plurals} of {table}{condition}{sort}",
            f"SELECT {', '.join(columns)} FROM {table}{where}{order_by};")


_QUERY = re.compile(
    r"SELECT (?P<what>\*|COUNT\(\*\)|[a-z]+(?:, [a-z]+)?) FROM (?P<table>[a-z]+)"
    r"(?: WHERE (?P<column>[a-z]+) (?P<op>[<>=]) (?P<value>[1-9][0-9]{0,2}|'[a-z]+'))?"
    r"(?: ORDER BY (?P<order>[a-z]+))?;")


def parse_sql(query: str) -> dict | None:
    """The parts of `query` if it belongs to the family above, else None."""
    match = _QUERY.fullmatch(query)
    if match is None or match["table"] not in TABLES:
        return None
    parts, table = match.groupdict(), match["table"]
    selected = [] if parts["what"] in ("*", "COUNT(*)") else parts["what"].split(", ")
    if any(c not in TABLES[table] for c in selected) or len(set(selected)) != len(selected):
        return None
    if parts["order"] is not None and (parts["order"] not in TABLES[table] or parts["what"] == "COUNT(*)"):
        return None
    if parts["column"] is not None:
        if parts["value"].startswith("'"):
            well_formed = table == "users" and parts["column"] == "city" and parts["op"] == "="
        else:
            well_formed = parts["column"] in NUMERIC_COLUMNS[table]
        if not well_formed:
            return None
    return parts
