"""Batches of encoded images for extraction: ordered by size so that
same-size photos share a request, cut by count and bytes, and a failing
batch split until each bad image is alone (`isolate`)."""

from deep_retrieval.data.image_headers import header_size


def isolate(items, call, reason):
    """``(rows, errors)`` for ``items`` (``[(name, data)]``): ``call`` on
    their data gives one result per item (``rows``: ``(name, result)``);
    a call that raises is split in halves until each failing item is alone,
    and ``reason(error)`` says what is wrong with it (``errors``:
    ``(name, reason)``), or raises when the error is not the items' own."""
    rows, errors, stack = [], [], [list(items)] if items else []
    while stack:
        batch = stack.pop()
        try:
            out = call([data for _, data in batch])
        except Exception as error:  # noqa: BLE001 - `reason` re-raises what is not the batch's own
            why = reason(error)
            if len(batch) == 1:
                errors.append((batch[0][0], why))
            else:
                half = len(batch) // 2
                stack.extend([batch[half:], batch[:half]])
            continue
        rows.extend((name, value) for (name, _), value in zip(batch, out))
    return rows, errors


def by_size(items):
    """``items`` ordered by image size (stable), so that same-size photos
    share a request and the server runs them as one batch; results are
    put back in input order when the output is written."""
    keys = [header_size(data) for _, data in items]
    return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


def batches(items, batch_size, max_bytes):
    """``items`` (``[(name, bytes)]``) in lists of at most ``batch_size``
    and ``max_bytes`` encoded bytes (a larger item goes alone)."""
    batch, size = [], 0
    for item in items:
        n = len(item[1]) if isinstance(item[1], (bytes, bytearray)) else 0
        if batch and (len(batch) == batch_size or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch
