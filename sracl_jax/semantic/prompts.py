"""SRA-CL's LLM prompts, and the offline texts used when no LLM is asked.

The wording is that of the paper's released prompt-building notebooks and request scripts
(github.com/ziqiangcui/SRA-CL: ``build_datasets&prompts/Amazon_*.ipynb`` and
``get_llmResponse&semanticEmb/obtain_response_{item,user}.py``), with the domain word made a
parameter.  The paper asks DeepSeek-V3 (``deepseek-chat``, temperature 0) with two messages per
request, a system message and a user message; `item_messages` / `user_messages` return that pair
and `item_prompt` / `user_prompt` the two joined into one text for single-message use.

* Item request.  System: "Assume you are a beauty products recommendation expert."  User: the
  item's attributes plus up to five title sequences of training users whose sequence ends with
  this item (the paper's "historical purchase information"), asking for a JSON answer with an
  "item summary" (<= 80 words) and a "potential user analysis" (<= 50 words).  The whole answer
  text, JSON included, is what the paper embeds.
* User request.  System: the instruction to summarise the user's preference in one paragraph of
  at most 100 words.  User: the titles of the user's items, oldest first, as
  ``<title 1>; <title 2>; ...`` (at most the 20 most recent, as the paper's sliding window).

Differences from the released text, all deliberate: the domain is a parameter (``"beauty
product"`` reproduces the Beauty wording up to capitalisation, ``"office product"`` and
``"sports_and_outdoors product"`` the other Amazon sets); the article before the domain is
grammatical ("an office ...", where Beauty's script says "an beauty ..."); the f-string's
indentation is removed; the paper's list-literal categories are rendered as the given text.
The Yelp variant (businesses, cities and stars) is not reproduced.

Domain words are singular noun phrases ("beauty product", "movie", "toy"); the plural adds an
"s".  The paper's requests all speak of purchases, and so do these for every domain.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

# The paper's user window: its data preparation keeps at most the 20 most recent items.
MAX_USER_ITEMS = 20
# The paper cuts item descriptions at 500 characters (Beauty and Sports; Office uses 1000).
MAX_DESCRIPTION_CHARS = 500
# Co-purchase histories in the item request: at most 5 sequences of the last 11 items each.
MAX_HISTORY_SEQUENCES = 5
MAX_HISTORY_ITEMS = 11

# The paper's "do not generally say ..." phrase per Amazon domain; else "<domain> enthusiasts".
_GENERIC_USERS = {
    "beauty product": "makeup enthusiasts",
    "office product": "office workers or people who like office supplies",
    "sports_and_outdoors product": "sports enthusiasts or outdoor enthusiasts",
    "sports and outdoors product": "sports enthusiasts or outdoor enthusiasts",
}

# Field names read from an item's metadata dict, first match wins (RecBole's MovieLens files say
# "movie_title" and "genre").  Any other non-empty field is added as "<name> is <value>".
_FIELD_ALIASES = {
    "title": ("title", "movie_title", "name"),
    "brand": ("brand", "store"),
    "categories": ("categories", "category", "genre", "genres"),
    "price": ("price",),
    "description": ("description",),
}


def _plural(domain: str) -> str:
  d = domain.strip()
  if d.endswith("s"):
    return d
  if d.endswith("y") and len(d) > 1 and d[-2] not in "aeiou":
    return d[:-1] + "ies"
  return d + "s"


def _article(phrase: str) -> str:
  return "an" if phrase[:1].lower() in "aeiou" else "a"


def _text(value) -> str:
  """One field value as clean text: lists joined with ", ", whitespace collapsed, None -> ""."""
  if value is None:
    return ""
  if isinstance(value, (list, tuple)):
    value = ", ".join(t for t in (_text(v) for v in value) if t)
  elif isinstance(value, float) and value != value:  # NaN
    return ""
  return " ".join(str(value).split())


def _split_fields(fields: Mapping[str, object]) -> Tuple[dict, dict]:
  """(known {canonical: text}, extra {name: text}) of an item's fields, empty values dropped."""
  known, used = {}, set()
  for canon, names in _FIELD_ALIASES.items():
    for name in names:
      if name in fields:
        used.add(name)
        if canon not in known:
          t = _text(fields[name])
          if t:
            known[canon] = t
  extra = {}
  for name, value in fields.items():
    if name not in used:
      t = _text(value)
      if t:
        extra[str(name)] = t
  return known, extra


def _cut(text: str, limit: int) -> Tuple[str, bool]:
  if len(text) <= limit:
    return text, False
  return text[:limit].rstrip(), True


def _clean_titles(titles: Sequence[str]) -> list:
  return [t for t in (_text(x) for x in titles) if t]


# ----------------------------------------------------------------------------------------------
# Item requests.


def item_info(fields: Mapping[str, object], domain: str) -> str:
  """The paper's one-line attribute text of an item, as placed inside the item request.

  Args:
    fields: the item's metadata, e.g. ``{"title", "brand", "categories", "price",
      "description"}`` (aliases such as ``movie_title`` / ``genre`` are understood); missing or
      empty values read "missing", as in the paper.
    domain: singular domain phrase, e.g. "beauty product".

  Returns:
    "The beauty product name is ...; brand is ...; categories are ...; price is ...; The detailed
    description of the beauty product is ......", the description cut at 500 characters.
  """
  known, extra = _split_fields(fields)
  parts = [f"The {domain} name is {known.get('title', 'missing')}",
           f"brand is {known.get('brand', 'missing')}",
           f"categories are {known.get('categories', 'missing')}"]
  parts += [f"{name} is {value}" for name, value in extra.items()]
  parts.append(f"price is {known.get('price', 'missing')}")
  desc, _ = _cut(known.get("description", "missing"), MAX_DESCRIPTION_CHARS)
  parts.append(f"The detailed description of the {domain} is {desc}......")
  return "; ".join(parts)


def _history_text(history: Optional[Sequence[Sequence[str]]]) -> str:
  """The paper's co-purchase block: "[t1 -> t2 -> item] #  \\n [...] #  \\n " or " [None] "."""
  seqs = []
  for seq in list(history or [])[:MAX_HISTORY_SEQUENCES]:
    titles = _clean_titles(list(seq)[-MAX_HISTORY_ITEMS:])
    if titles:
      seqs.append("[" + " -> ".join(titles) + "] #  \n ")
  return "".join(seqs) if seqs else " [None] "


def item_system_prompt(domain: str) -> str:
  """The system message of the paper's item request.

  Args:
    domain: singular domain phrase, e.g. "beauty product".

  Returns:
    "Assume you are a beauty products recommendation expert."
  """
  plural = _plural(domain)
  return f"Assume you are {_article(plural)} {plural} recommendation expert."


def item_user_prompt(fields: Mapping[str, object], domain: str,
                     history: Optional[Sequence[Sequence[str]]] = None,
                     generic_users: Optional[str] = None) -> str:
  """The user message of the paper's item request.

  Args:
    fields: the item's metadata (see `item_info`).
    domain: singular domain phrase, e.g. "beauty product".
    history: optional title sequences of *training* users who bought this item, each ending with
      this item's title (the paper samples up to 5 such sequences with seed 0, from its sliding
      windows of 2..21 items, each cut to its last 11 items).  At most the first 5 are used, each
      cut to its last 11 titles; empty titles are dropped.  None or empty -> " [None] ", as in the
      paper.  The caller must build them from training data only, or the summary leaks the
      validation / test items.
    generic_users: the too-generic description the LLM is told to avoid; defaults to the paper's
      phrase for its Amazon domains ("makeup enthusiasts", ...) and "<domain> enthusiasts" else.

  Returns:
    The request text (multi-line).
  """
  plural = _plural(domain)
  if generic_users is None:
    generic_users = _GENERIC_USERS.get(domain.strip().lower(), f"{domain} enthusiasts")
  return (
      f"Assume you are {_article(plural)} {plural} recommendation expert. Please help me analyze "
      f"a specific {domain}. You will be provided with the following information:\n"
      f"1) The basic information of the {domain}: {item_info(fields, domain)};\n"
      f"2) The historical purchase information of users who have bought this {domain}: "
      f"{_history_text(history)}. Here, different sequences are separated by '#', and each "
      "sequence is in LIST format, representing a certain user's historical purchases. Items in "
      "each sequence are separated by '->', and the last item in all sequences is the specific "
      f"{domain} mentioned above.\n"
      "\n"
      "Requirements:\n"
      f"1) Please briefly describe the given {domain}.\n"
      "2) Based on the provided sequences, please analyze what type of users would purchase this "
      f"specific {domain}. Please do not generally say {generic_users}, as all users in this "
      f"context have a need to purchase {plural}. Instead, please provide a more detailed "
      "granularity.\n"
      "Please provide your answer in JSON format, following this structure:\n"
      "{\n"
      '"item summary": "A description of the item, no more than 80 words.",\n'
      '"potential user analysis": "what type of users would purchase this item, no more than 50 '
      'words."\n'
      "}")


def item_messages(fields: Mapping[str, object], domain: str,
                  history: Optional[Sequence[Sequence[str]]] = None,
                  generic_users: Optional[str] = None) -> Tuple[str, str]:
  """(system, user) messages of the paper's item request; arguments as `item_user_prompt`."""
  return (item_system_prompt(domain),
          item_user_prompt(fields, domain, history=history, generic_users=generic_users))


def item_prompt(fields: Mapping[str, object], domain: str,
                history: Optional[Sequence[Sequence[str]]] = None,
                generic_users: Optional[str] = None) -> str:
  """The paper's item request as one text (system message, blank line, user message).

  Args:
    fields: the item's metadata (see `item_info`).
    domain: singular domain phrase, e.g. "beauty product", "movie", "toy".
    history: optional co-purchase title sequences (see `item_user_prompt`).
    generic_users: see `item_user_prompt`.

  Returns:
    The prompt text, for clients that send a single user message.
  """
  system, user = item_messages(fields, domain, history=history, generic_users=generic_users)
  return system + "\n\n" + user


# ----------------------------------------------------------------------------------------------
# User requests.


def user_system_prompt(domain: str) -> str:
  """The system message of the paper's user request (it carries the whole instruction).

  Args:
    domain: singular domain phrase, e.g. "beauty product".

  Returns:
    The instruction text, ending with a newline as the paper's does.
  """
  plural = _plural(domain)
  return (
      f"Assume you are {_article(plural)} {plural} recommendation expert.\n"
      f"You will be provided with a user's historical purchases of {plural} in chronological "
      "order, given in the following format:\n"
      "<The title of item1>; <The title of item2>; <The title of item3>;... \n"
      f"Please summarize the user's specific preference when purchasing {plural}. Note that your "
      "response should be a coherent paragraph of no more than 100 words.\n")


def user_user_prompt(item_titles: Sequence[str], max_items: int = MAX_USER_ITEMS) -> str:
  """The user message of the paper's user request: ``<title 1>; <title 2>; ...``.

  Args:
    item_titles: titles of the user's training items, oldest first.
    max_items: keep only the most recent this many titles (the paper's window is 20).

  Returns:
    The titles, each in angle brackets, joined by "; " (empty titles dropped).
  """
  titles = _clean_titles(item_titles)
  if max_items > 0:
    titles = titles[-max_items:]
  return "; ".join(f"<{t}>" for t in titles)


def user_messages(item_titles: Sequence[str], domain: str,
                  max_items: int = MAX_USER_ITEMS) -> Tuple[str, str]:
  """(system, user) messages of the paper's user request; arguments as `user_prompt`."""
  return user_system_prompt(domain), user_user_prompt(item_titles, max_items=max_items)


def user_prompt(item_titles: Sequence[str], domain: str, max_items: int = MAX_USER_ITEMS) -> str:
  """The paper's user request as one text (the instruction, then the titles).

  Args:
    item_titles: titles of the items in the user's training prefix, oldest first.
    domain: singular domain phrase, e.g. "beauty product", "movie", "toy".
    max_items: keep only the most recent this many titles (the paper's window is 20).

  Returns:
    The prompt text, for clients that send a single user message.
  """
  system, user = user_messages(item_titles, domain, max_items=max_items)
  return system + user


# ----------------------------------------------------------------------------------------------
# Offline texts: what goes straight to the sentence encoder when no LLM is used.


def item_template_text(fields: Mapping[str, object]) -> str:
  """An item's metadata as one line: "Title: ...; Categories: ...; Brand: ...; ...".

  Args:
    fields: the item's metadata (see `item_info`); empty fields are left out.

  Returns:
    "Title: t; Categories: c; Brand: b; Price: p; <other>: v; Description: d", in that order,
    the description cut at 500 characters (marked "..."); "Unknown item." when nothing is known.
  """
  known, extra = _split_fields(fields)
  parts = [f"{label}: {known[canon]}" for canon, label in
           (("title", "Title"), ("categories", "Categories"), ("brand", "Brand"),
            ("price", "Price")) if canon in known]
  parts += [f"{name.replace('_', ' ').capitalize()}: {value}" for name, value in extra.items()]
  if "description" in known:
    desc, cut = _cut(known["description"], MAX_DESCRIPTION_CHARS)
    parts.append(f"Description: {desc}" + ("..." if cut else ""))
  return "; ".join(parts) if parts else "Unknown item."


def user_template_text(item_titles: Sequence[str], max_items: int = MAX_USER_ITEMS,
                       verb: str = "bought") -> str:
  """A user's prefix as one line: "The user bought: t1; t2; ...".

  Long prefixes are cut to their most recent ``max_items`` titles (the oldest are dropped, as the
  paper's 20-item window does), so the text stays within the sentence encoder's input length.

  Args:
    item_titles: titles of the items in the user's training prefix, oldest first.
    max_items: keep only the most recent this many titles; <= 0 keeps all.
    verb: the action word ("bought", "watched", ...).

  Returns:
    The text; "The user <verb> nothing yet." for an empty prefix.
  """
  titles = _clean_titles(item_titles)
  if max_items > 0:
    titles = titles[-max_items:]
  if not titles:
    return f"The user {verb} nothing yet."
  return f"The user {verb}: " + "; ".join(titles)
