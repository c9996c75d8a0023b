"""Multipart forms at the edge: parsed strictly, once, and answered there (see :func:`parse_form`);
BentoML never parses them again, so no second copy of a photo is read, spooled to /tmp or copied
once more by its validators, and the two parsers can never disagree about what a body holds. No torch here.
"""

from __future__ import annotations

import re
from typing import Any

# What each endpoint's multipart form may hold: field -> must it be a file.
FORM_FIELDS = {"/classify": {"image": True, "top_k": False, "min_score": False},
               "/classify_batch": {"images": True, "top_k": False, "min_score": False}}
MAX_BOUNDARY = 70  # RFC 2046: a multipart boundary is 1 to 70 characters

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PARAM = re.compile(rb';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\\r\n]|\\.)*"|[^;\s]*)')
PART_HEADERS = (b"content-disposition", b"content-type")
MAX_PART_HEAD = 8 * 1024  # bytes of headers a part may carry


class FormError(ValueError):
    """A multipart form the edge refuses (answered 400 with this message)."""


def params(value: bytes) -> dict[bytes, bytes]:
    """A header's ``; name=value`` parameters, names lower-cased (``BOUNDARY=`` is ``boundary=``)."""
    out: dict[bytes, bytes] = {}
    for name, raw in _PARAM.findall(b";" + value.split(b";", 1)[1] if b";" in value else b""):
        out[name.lower()] = raw[1:-1].replace(b'\\"', b'"') if raw.startswith(b'"') else raw
    return out


def boundary_of(content_type: bytes) -> bytes | None:
    """A multipart Content-Type's boundary, or None."""
    return params(content_type).get(b"boundary") or None


def parse_form(body: bytes, content_type: bytes, path: str, query: dict[str, str],
               max_parts: int) -> tuple[list[memoryview], dict[str, str]]:
    """A multipart form, parsed strictly (see :func:`_parts`; a text value in the photo field, which
    BentoML once took for a URL to download, is refused) -> its photos (views into ``body``, no
    copies) and its text fields: ``top_k`` (digits) and ``min_score`` (a number 0-1) once each, the
    URL's ``?top_k=`` / ``?min_score=`` merged in (and refused when they disagree with the form's)."""
    fields = FORM_FIELDS[path]
    photo = next(f for f, is_file in fields.items() if is_file)
    hint = f"send the photo as the multipart field '{photo}' (curl -F {photo}=@photo.jpg)"
    boundary = boundary_of(content_type)
    if not boundary:
        raise FormError(f"the multipart Content-Type has no boundary parameter; {hint}")
    if len(boundary) > MAX_BOUNDARY:
        raise FormError(f"the multipart boundary is {len(boundary)} characters long, over the {MAX_BOUNDARY} that "
                        f"RFC 2046 allows; {hint}")
    delim = b"--" + boundary
    photos: list[memoryview] = []
    text: dict[str, str] = {}
    for headers, value in _parts(body, delim, max_parts, hint):
        disp = headers.get(b"content-disposition", b"")
        p = params(disp)
        if disp.split(b";")[0].strip().lower() != b"form-data" or b"name" not in p:
            raise FormError(f"a part has no 'Content-Disposition: form-data; name=...' header; {hint}")
        field = p[b"name"].decode("utf-8", "replace")
        if field not in fields:
            raise FormError(f"unknown field {field[:40]!r}: this endpoint takes " + ", ".join(f"'{f}'" for f in fields)
                            + ("" if photos or b"filename" not in p else f"; {hint}"))
        if fields[field]:
            if b"filename" not in p:
                raise FormError(f"the field '{field}' holds text, not a file; send the photo as a file "
                                f"(curl -F {field}=@photo.jpg: the @ sends the file)")
            if photos and path == "/classify":
                raise FormError(f"more than one '{photo}' field; /classify takes one photo, /classify_batch "
                                "several ('images')")
            photos.append(value)
        else:
            if b"filename" in p:
                raise FormError(f"'{field}' is a number, not a file; send it as -F {field}=5")
            if field in text:
                raise FormError(f"'{field}' is given more than once; give it once")
            try:
                text[field] = CHECK[field](bytes(value).decode("utf-8"))
            except UnicodeDecodeError:
                raise FormError(f"{field} must be written in ASCII digits") from None
    if not photos:
        raise FormError(f"no '{photo}' field; {hint}")
    for field, value in query.items():
        CHECK[field](value)
        if field in text and text[field].strip() != value.strip():
            raise FormError(f"{field} is {value!r} in the URL and {text[field]!r} in the form; give it once")
        text[field] = value
    return photos, {k: v.strip() for k, v in text.items()}


def _parts(body: bytes, delim: bytes, max_parts: int, hint: str) -> list[tuple[dict[bytes, bytes], memoryview]]:
    """A multipart body's parts (headers, value), strictly: each boundary line ends right after the
    boundary, headers end in a blank line, the closing boundary comes last with nothing after it."""
    at = 0 if body.startswith(delim) else body.find(b"\r\n" + delim)
    if at < 0:
        raise FormError(f"the body holds no '{delim.decode('latin-1')}' boundary line; {hint}")
    at += 0 if body.startswith(delim) else 2
    parts: list[tuple[dict[bytes, bytes], memoryview]] = []
    view = memoryview(body)
    while True:
        at += len(delim)
        if body.startswith(b"--", at):  # the closing boundary: only padding and line ends may follow
            if body[at + 2 :].strip(b" \t\r\n"):
                raise FormError("bytes after the closing boundary; end the form with its closing boundary")
            return parts
        line_end = body.find(b"\r\n", at)
        if line_end < 0 or body[at:line_end].strip(b" \t"):
            raise FormError("bytes after a boundary on its line; each boundary line ends right after the boundary")
        if len(parts) >= max_parts:
            raise FormError(f"over {max_parts} parts in one form (EXTENDSERVE_MAX_BATCH_PHOTOS); split the photos "
                            "over several requests")
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0 or head_end - line_end > MAX_PART_HEAD:
            raise FormError("a part's headers do not end in a blank line; send the form with curl -F or a "
                            "multipart library")
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise FormError("the multipart body has no closing boundary; it may have been cut off, send it again")
        parts.append((_part_headers(body[line_end + 2 : head_end]), view[head_end + 4 : nxt]))
        at = nxt + 2


def _part_headers(block: bytes) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            raise FormError("a folded header line in a part (a line starting with a space); write each header on one line")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise FormError(f"a part's header line {line[:60].decode('latin-1')!r} is not 'Name: value'")
        key = name.lower()
        if key not in PART_HEADERS:
            raise FormError(f"a part carries the header {name[:40].decode('latin-1')!r}; a form part here takes only "
                            "Content-Disposition and Content-Type")
        if key in headers:
            raise FormError(f"a part carries two {name.decode('latin-1')} headers; give each once")
        headers[key] = value.strip()
    return headers


def strict_int(value: Any) -> Any:
    """``top_k`` as ASCII digits only: '1e3', '5.0', 'true' and '²' are refused, not read as 1000, 5, 1, 2."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()) is not None)
    if not ok:  # BentoML reads form fields as JSON first: '1e3' arrives as 1000.0, 'true' as True
        raise ValueError(f"top_k must be a whole number from 1 up to the model's classes, written in digits (such as 5), "
                         f"not {value!r}")
    return value


def strict_share(value: Any) -> Any:
    """``min_score`` as a plain decimal from 0 to 1 ('0.5', '1'): 'nan', '1e-1' and '²' are refused."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1) or (
        isinstance(value, str) and re.fullmatch(r"(0|1)(\.[0-9]{1,9})?|\.[0-9]{1,9}", value.strip()) is not None
        and 0 <= float(value) <= 1)
    if not ok:
        raise ValueError(f"min_score must be a number from 0 to 1 written in digits, such as 0.5, not {value!r}")
    return value


CHECK = {"top_k": strict_int, "min_score": strict_share}  # each text field's check (ValueError says the fix)
