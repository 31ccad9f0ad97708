"""Small synthetic Amazon review dumps in the real 2014, 2018 and 2023 file formats.

Usable by any test: ``write_world(tmp_dir, year)`` writes a review file and a metadata file with the
known structure below; the ``write_reviews_*`` / ``write_meta_*`` functions write arbitrary rows.

Rows are ``(user, item, time, rating)`` in file order; ``time`` is in the unit of the format
(seconds for 2014/2018, milliseconds for 2023).  Item metadata specs are format-neutral dicts with
``title``, ``brand`` (None: key absent), ``categories`` (list of category paths, each a list of str),
``price`` (float or None), ``description`` (str); each writer renders them the way its release does.

The world (times in seconds; ``write_world`` multiplies by 1000 for 2023):

  file order             sorted by (user, time), ties in file order (k_core=0)
  UB  B0003  300  5.0    UA: B0002@50  B0001@100 B0003@200  -> ids [2, 1, 3]
  UA  B0001  100  4.0    UB: B0002@100 B0003@300 B0001@300  -> ids [2, 3, 1]
  UA  B0002   50  3.0    UC: B0002@10  B0004@20             -> ids [2, 4]
  UB  B0001  300  2.0
  UA  B0003  200  5.0    2-core: B0004 (1 row) goes in pass 1, then UC (1 row left) in pass 2.
  UC  B0002   10  1.0
  UB  B0002  100  4.0    B0004 has no metadata; B0009 has metadata but no reviews.
  UC  B0004   20  5.0
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

Row = Tuple[str, str, int, float]

WORLD_ROWS: Sequence[Row] = (
    ("UB", "B0003", 300, 5.0),
    ("UA", "B0001", 100, 4.0),
    ("UA", "B0002", 50, 3.0),
    ("UB", "B0001", 300, 2.0),
    ("UA", "B0003", 200, 5.0),
    ("UC", "B0002", 10, 1.0),
    ("UB", "B0002", 100, 4.0),
    ("UC", "B0004", 20, 5.0),
)

WORLD_META: Dict[str, dict] = {
    "B0001": dict(title="L'Oreal Night Cream &amp; Serum", brand="L'Oreal",
                  categories=[["Beauty", "Skin Care", "Face"], ["Beauty", "Gift Sets"]],
                  price=12.5, description="Rich   night cream.\nFor all skin types."),
    "B0002": dict(title="Shampoo", brand=None, categories=[], price=None,
                  description="word " * 600),
    "B0003": dict(title="Soap", brand="Dove", categories=[["Beauty"]], price=3.0,
                  description="Gentle."),
    "B0009": dict(title="Unreviewed", brand="Nobody", categories=[["Beauty"]], price=1.0,
                  description="Never reviewed."),
}

MAIN_CATEGORY = "All Beauty"


def _open_w(path: str):
  return gzip.open(path, "wt", encoding="utf-8") if path.endswith(".gz") else open(
      path, "w", encoding="utf-8")


def _write_lines(path: str, lines: Iterable[str]) -> str:
  with _open_w(path) as f:
    for line in lines:
      f.write(line + "\n")
  return path


def _review_date(t: int) -> str:
  import time as _time
  return _time.strftime("%m %d, %Y", _time.gmtime(t))


# 2014 (McAuley et al.) ------------------------------------------------------------------------


def write_reviews_2014(path: str, rows: Iterable[Row], literal: bool = False) -> str:
  """reviews_<Cat>_5.json(.gz): JSON lines (``literal=True``: Python-literal lines)."""
  def line(r):
    user, item, t, rating = r
    rec = {"reviewerID": user, "asin": item, "reviewerName": f"name of {user}",
           "helpful": [0, 0], "reviewText": "It's fine.", "overall": rating,
           "summary": "ok", "unixReviewTime": t, "reviewTime": _review_date(t)}
    return repr(rec) if literal else json.dumps(rec)
  return _write_lines(path, (line(r) for r in rows))


def write_meta_2014(path: str, metas: Dict[str, dict]) -> str:
  """meta_<Cat>.json(.gz): one Python literal (single quotes) per line, as in the real dump."""
  def line(item, m):
    rec = {"asin": item}
    if m.get("description") is not None:
      rec["description"] = m["description"]
    if m.get("title") is not None:
      rec["title"] = m["title"]
    if m.get("price") is not None:
      rec["price"] = m["price"]
    rec["imUrl"] = f"http://ecx.images-amazon.com/images/I/{item}.jpg"
    rec["related"] = {"also_bought": ["B0009"], "bought_together": []}
    rec["salesRank"] = {"Beauty": 12345}
    if m.get("brand") is not None:
      rec["brand"] = m["brand"]
    rec["categories"] = m.get("categories", [])
    return repr(rec)
  return _write_lines(path, (line(k, m) for k, m in metas.items()))


# 2018 (Ni et al.) -----------------------------------------------------------------------------


def write_reviews_2018(path: str, rows: Iterable[Row]) -> str:
  """<Cat>_5.json(.gz): JSON lines."""
  def line(r):
    user, item, t, rating = r
    return json.dumps({"overall": rating, "verified": True, "reviewTime": _review_date(t),
                       "reviewerID": user, "asin": item, "style": {"Size:": " 8 oz"},
                       "reviewerName": f"name of {user}", "reviewText": "Works.",
                       "summary": "Five Stars", "unixReviewTime": t})
  return _write_lines(path, (line(r) for r in rows))


def write_meta_2018(path: str, metas: Dict[str, dict], duplicate: Optional[str] = None) -> str:
  """meta_<Cat>.json(.gz): JSON lines; price "$x.xx" or ""; ``duplicate``: repeat that item last."""
  def rec(item, m):
    cats = m.get("categories") or []
    desc = m.get("description")
    return {"category": list(cats[0]) if cats else [], "tech1": "",
            "description": desc.split("\n") if desc else [], "fit": "",
            "title": m.get("title") or "", "also_buy": ["B0009"], "image": [],
            "tech2": "", "brand": m.get("brand") or "", "feature": [], "rank": [],
            "also_view": [], "main_cat": MAIN_CATEGORY, "similar_item": "", "date": "",
            "price": f"${m['price']:.2f}" if m.get("price") is not None else "", "asin": item}
  lines = [json.dumps(rec(k, m)) for k, m in metas.items()]
  if duplicate is not None:
    dup = rec(duplicate, metas[duplicate])
    dup["title"] = "DUPLICATE"
    lines.append(json.dumps(dup))
  return _write_lines(path, lines)


# 2023 (Hou et al.) ----------------------------------------------------------------------------


def variant_asin(item: str) -> str:
  """The (variant) ``asin`` the 2023 writer puts next to ``parent_asin``."""
  return item + "X"


def write_reviews_2023(path: str, rows: Iterable[Row]) -> str:
  """<Cat>.jsonl(.gz): JSON lines, millisecond ``timestamp``, items under ``parent_asin``."""
  def line(r):
    user, item, t_ms, rating = r
    return json.dumps({"rating": rating, "title": "Nice", "text": "Works.", "images": [],
                       "asin": variant_asin(item), "parent_asin": item, "user_id": user,
                       "timestamp": t_ms, "helpful_vote": 0, "verified_purchase": True})
  return _write_lines(path, (line(r) for r in rows))


def write_meta_2023(path: str, metas: Dict[str, dict]) -> str:
  """meta_<Cat>.jsonl(.gz): JSON lines; price float or null; brand under ``store``."""
  def line(item, m):
    cats = m.get("categories") or []
    desc = m.get("description")
    return json.dumps({"main_category": MAIN_CATEGORY, "title": m.get("title") or "",
                       "average_rating": 4.5, "rating_number": 10, "features": [],
                       "description": desc.split("\n") if desc else [],
                       "price": m.get("price"), "images": [], "videos": [],
                       "store": m.get("brand"), "categories": list(cats[0]) if cats else [],
                       "details": {"Brand": m.get("brand") or ""}, "parent_asin": item,
                       "bought_together": None})
  return _write_lines(path, (line(k, m) for k, m in metas.items()))


# The world ------------------------------------------------------------------------------------


def write_world(directory: str, year: int, gz: bool = True,
                rows: Sequence[Row] = WORLD_ROWS,
                metas: Optional[Dict[str, dict]] = None) -> Tuple[str, str]:
  """Writes ``rows`` (times in seconds) and metadata in the ``year`` format; returns the paths."""
  metas = WORLD_META if metas is None else metas
  ext = ".gz" if gz else ""
  if year == 2014:
    reviews = write_reviews_2014(os.path.join(directory, f"reviews_Beauty_5.json{ext}"), rows)
    meta = write_meta_2014(os.path.join(directory, f"meta_Beauty.json{ext}"), metas)
  elif year == 2018:
    reviews = write_reviews_2018(os.path.join(directory, f"Luxury_Beauty_5.json{ext}"), rows)
    meta = write_meta_2018(os.path.join(directory, f"meta_Luxury_Beauty.json{ext}"), metas,
                           duplicate="B0001" if "B0001" in metas else None)
  elif year == 2023:
    reviews = write_reviews_2023(os.path.join(directory, f"All_Beauty.jsonl{ext}"),
                                 [(u, i, t * 1000, r) for u, i, t, r in rows])
    meta = write_meta_2023(os.path.join(directory, f"meta_All_Beauty.jsonl{ext}"), metas)
  else:
    raise ValueError(f"unknown Amazon release {year}")
  return reviews, meta
