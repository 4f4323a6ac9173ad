"""The `sql` demo task: a small English-to-SQL template grammar.

    request   := "show all " TABLE [COND] [SORT]
               | "show " COLS " of " TABLE [COND] [SORT]
               | "count " TABLE [COND]
    COLS      := PLURAL | PLURAL " and " PLURAL
    COND      := " with " NUMCOL (" above " | " below " | " equal to ") NUMBER
               | " older than " NUMBER | " younger than " NUMBER        (users only)
               | " from " CITY                                          (users only)
    SORT      := " sorted by " COL

    "show names of users older than 30"  ->  "SELECT name FROM users WHERE age > 30;"
    "count orders with total above 250"  ->  "SELECT COUNT(*) FROM orders WHERE total > 250;"
    "show all users from paris"          ->  "SELECT * FROM users WHERE city = 'paris';"
"""

from __future__ import annotations

import random

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
CITIES = ("paris", "london", "tokyo", "lima", "oslo", "cairo", "delhi", "rome")


def _condition(rng: random.Random, table: str) -> tuple[str, str]:
    """(request phrase, SQL clause); both empty when there is no condition."""
    kind = rng.random()
    if kind < 0.25:
        return "", ""
    number = str(rng.randint(1, 999) if rng.random() < 0.5 else rng.randint(1, 99))
    if table == "users" and kind < 0.5:
        return " older than " + number, " WHERE age > " + number
    if table == "users" and kind < 0.6:
        return " younger than " + number, " WHERE age < " + number
    if table == "users" and kind < 0.75:
        city = rng.choice(CITIES)
        return " from " + city, f" WHERE city = '{city}'"
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
        return f"count {table}{condition}", f"SELECT COUNT(*) FROM {table}{where};"
    sort, order_by = _sort(rng, table)
    if form < 0.4:
        return f"show all {table}{condition}{sort}", f"SELECT * FROM {table}{where}{order_by};"
    columns = rng.sample(tuple(TABLES[table]), rng.choice((1, 1, 2)))
    plurals = " and ".join(TABLES[table][c] for c in columns)
    return (f"show {plurals} of {table}{condition}{sort}",
            f"SELECT {', '.join(columns)} FROM {table}{where}{order_by};")
