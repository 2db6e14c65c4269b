"""The front's batch routes, ``POST /cache/<group>?op=get|set|delete`` (the JSON bodies:
batch.py), as a part of ``Front`` (http_front.py); the status a failed load answers.

Batches (``Content-Type: application/json``; values travel as base64):

    op=get     {"keys": ["k1", "k2", "k3"]}
               -> 200 {"values": {"k1": "<base64>"}, "missing": ["k2"],
                       "errors": {"k3": {"status": 500, "reason": "..."}}}
               Each key is answered as a single GET would be: a hit from memory, a miss
               loaded (each through the host-wide singleflight, from its owner on a
               cluster; at most BATCH_LOADS of one batch at a time, so that a batch of cold
               keys neither fills the worker's pool nor queues thousands of fetches on one
               peer's connections); absent keys are "missing"; a failed load is in "errors" with
               the status its GET would have had (500 load error, 502 peer unavailable,
               504 timeout). The answer comes when every load is done. A read: it needs the
               token only with --token-reads.
    op=set     {"items": {"k1": "<base64>"}, "ttl": 60}          (ttl optional, seconds > 0)
               -> 200 {"stored": N}; 413 if any value is too large (nothing is stored);
               on a cluster each key goes to its owner as a PUT would, and if a peer failed:
               502 {"stored": N, "failed_peers": [url, ...], "peer_errors": {url: reason}}
               (N: keys stored on their owner).
    op=delete  {"keys": ["k1", ...]}
               -> 200 {"deleted": ["k1"]}: the keys that were there (on a cluster, as the
               DELETE of one key answers: removed here, or the owner acknowledged); 502 as
               for set.

At most MAX_BATCH_KEYS (10,000) keys a request, each valid as in a single request (1 to
--max-key-bytes UTF-8 bytes); a key given twice is answered once. A POST body may be 64 MiB
(more if --max-item-size needs it: batch.max_batch_body), else 413. Unknown group: 404. A
missing or unknown op, malformed JSON, a wrong shape, unknown fields, bad base64 or a bad
ttl: 400. Writes need the token.
"""

import json
import logging
import threading
from urllib.parse import parse_qs

from .batch import MAX_BATCH_KEYS, OPS, b64, unb64
from .errors import (InvalidKey, LoadError, LoadTimeout, NotFound, PeerUnavailable, UnknownGroup,
                     ValueTooLarge)
from .futures import FUTURES, Promise, all_done, then
from .httpserver import error, render
from .reader import NOT_FOUND
from .validate import positive_ttl

log = logging.getLogger("shmcache")

BATCH_LOADS = 32            # loads one batch get runs at once: half the default --threads

JSON = b"application/json"

_LOAD_STATUS = ((NotFound, 404), (UnknownGroup, 404), (PeerUnavailable, 502),
                (LoadTimeout, 504), (LoadError, 500))


def load_status(exc):
    """The status a GET answers for a load that raised ``exc``; None for an unexpected one."""
    for kind, status in _LOAD_STATUS:
        if isinstance(exc, kind):
            return status
    return None


class BatchRoutes:
    """The batch routes of a ``Front``, which provides ``node`` and ``_check_key``."""

    def _batch_delete(self, group, keys):
        node = self.node
        if not node.clustered:
            return then(node.pool.submit(node.store.delete_many, group, keys), lambda done:
                        _json_answer(200, {"deleted": [key for key, there in
                                                       zip(keys, done.result()) if there]}))
        return then(all_done(node.run_all(node.delete_everywhere, [(group, k) for k in keys])),
                    lambda done: self._cluster_batch_answer(done, keys, "deleted"))

    def _batch_keys(self, document):
        """The distinct keys of a {"keys": [...]} body, in order; ValueError if malformed."""
        return list(dict.fromkeys(self._keyed(document, "keys", list, '{"keys": [key, ...]}')))

    def _keyed(self, document, field, kind, shape):
        """``document[field]``, a ``kind`` of at most MAX_BATCH_KEYS valid keys (a list, or
        a dict keyed by them); ValueError (naming ``shape``) or InvalidKey if not."""
        keys = document.get(field)
        if not isinstance(keys, kind):
            raise ValueError(f"the body must be {shape}")
        if len(keys) > MAX_BATCH_KEYS:
            raise ValueError(f"{len(keys)} keys; a batch holds at most {MAX_BATCH_KEYS}")
        for key in keys:
            self._check_key(key)
        return keys

    def _batch_get(self, group, keys):
        """Hits answered from memory; the misses loaded each as a single GET, at most
        BATCH_LOADS at a time: the keys are taken in order, and a miss that would be one
        too many waits for a load of the batch to end. The answer (bytes when every key was
        answered at once, else a Promise of it) comes when every load is done.

        ``state`` is guarded by ``lock``; node.get and add_done_callback are called outside
        it. Each key takes a slot when it is taken and gives it back when answered: at once
        for a hit, when its load ends for a miss. Whoever gives back the last slot once every
        key is taken (any thread: a load ends where it ends) finds ``finished`` unset, sets
        it under the lock and answers; nobody else can, so the batch is answered once.

        One thread takes keys at a time (``pumping``), so a load that is done already, whose
        callback runs at once inside the taking loop, does not recurse into it. The loop
        decides to stop and clears ``pumping`` in one critical section, and a load that ends
        gives its slot back before it asks to take keys: either the loop sees the free slot,
        or the load finds ``pumping`` clear and takes the keys itself. No slot is left idle."""
        node = self.node
        values, pending, missing = {}, {}, []
        lock = threading.Lock()
        state = {"next": 0, "slots": 0, "pumping": False, "finished": False}
        result = Promise()

        def give_back():
            """A key answered; True for the one call that ends the batch."""
            with lock:
                state["slots"] -= 1
                if state["slots"] or state["next"] < len(keys) or state["finished"]:
                    return False
                state["finished"] = True
                return True

        def take_keys():
            """Take keys while slots are free (unless another thread is at it); True if a
            hit answered here ended the batch."""
            with lock:
                if state["pumping"]:
                    return False
                state["pumping"] = True
            ended = False
            try:
                while True:
                    with lock:
                        if state["slots"] >= BATCH_LOADS or state["next"] >= len(keys):
                            state["pumping"] = False
                            return ended
                        key = keys[state["next"]]
                        state["next"] += 1
                        state["slots"] += 1
                    answer = node.get(group, key)
                    if isinstance(answer, FUTURES):
                        with lock:
                            pending[key] = answer
                        answer.add_done_callback(load_done)
                        continue
                    with lock:
                        if answer is NOT_FOUND:
                            missing.append(key)
                        else:
                            values[key] = answer[0]
                    ended = give_back() or ended
            except BaseException:
                with lock:
                    state["pumping"] = False
                raise

        def answer_with(step):
            try:
                if step():
                    result.set_result(self._batch_get_answer(values, pending, missing))
            except BaseException as exc:              # a bug: the request gets a 500
                if not result.done():
                    result.set_exception(exc)

        def load_done(_done):
            answer_with(give_back)
            fetcher = node.fetcher
            if fetcher is not None and not fetcher.in_loop():   # the next keys on the loop,
                fetcher.loop.call_soon_threadsafe(lambda: answer_with(take_keys))   # as GETs
            else:
                answer_with(take_keys)

        if not keys or take_keys():
            return self._batch_get_answer(values, pending, missing)
        return result

    @staticmethod
    def _batch_get_answer(values, pending, missing):
        errors = {}
        for key, future in pending.items():
            try:
                values[key] = future.result()[0]
            except NotFound:
                missing.append(key)
            except Exception as exc:
                status = load_status(exc)
                if status is None:
                    log.error("batch load of %r failed", key, exc_info=exc)
                    status, exc = 500, "internal error"
                errors[key] = {"status": status, "reason": str(exc)}
        return _json_answer(200, {"values": {key: b64(value) for key, value in values.items()},
                                  "missing": missing, "errors": errors})

    def _batch_set(self, group, body):
        """(On the pool.) The answer to a set batch, or a Future of it on a cluster."""
        try:
            document = _json_body(body, {"items", "ttl"})
            items = self._keyed(document, "items", dict,
                                '{"items": {key: base64 value, ...}, "ttl": seconds}')
            items = {key: unb64(value) for key, value in items.items()}
            ttl = document.get("ttl")
            if ttl is not None:
                if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
                    raise ValueError("ttl must be a positive number of seconds")
                ttl = positive_ttl(ttl)
            node = self.node
            if not node.clustered:
                node.store.set_many(group, items.items(), ttl)
                return _json_answer(200, {"stored": len(items)})
            node.store.check_fits_many(group, items.items())
        except ValueTooLarge as exc:
            return error(413, str(exc))
        except (ValueError, InvalidKey) as exc:
            return error(400, str(exc))
        return then(all_done(node.run_all(node.set_everywhere, [(group, key, value, ttl)
                                                                for key, value in items.items()])),
                    lambda done: self._cluster_batch_answer(done, list(items), "stored"))

    @staticmethod
    def _cluster_batch_answer(done, keys, field):
        """200 if every host did its part for every key, else 502 naming the failed peers.
        ``field`` "stored": how many keys reached their owner; "deleted": which keys."""
        outcomes = [future.result() for future in done.result()]
        peer_errors = {}
        for outcome in outcomes:
            for url, reason in outcome["failed_peers"].items():
                peer_errors.setdefault(url, reason)
        succeeded = [key for key, outcome in zip(keys, outcomes) if outcome[field]]
        answer = {field: len(succeeded) if field == "stored" else succeeded}
        if peer_errors:
            answer.update(failed_peers=sorted(peer_errors), peer_errors=peer_errors)
        return _json_answer(502 if peer_errors else 200, answer)


def _query(query, allowed):
    """{name: [values]} of a query string; ValueError if malformed or a name not allowed."""
    if not query:
        return {}
    try:
        fields = parse_qs(query, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed query string") from None
    unknown = set(fields) - set(allowed)
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r}")
    return fields


def _batch_op(query):
    """The op of a batch request's query string; ValueError unless exactly one known op."""
    ops = _query(query, ("op",)).get("op")
    if ops is None:
        raise ValueError(f"POST /cache/<group> needs ?op={'|'.join(OPS)}")
    if len(ops) != 1 or ops[0] not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}")
    return ops[0]


def _json_body(body, fields):
    """The JSON object of a request body with no field but ``fields``; ValueError if not."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(document) - fields
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r} in the body")
    return document


def _json_answer(status, document):
    return render(status, json.dumps(document) + "\n", content_type=JSON)
