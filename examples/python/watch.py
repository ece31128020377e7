#!/usr/bin/env python3
"""A cache of users kept true by identity's change feed (docs/changes.md).

    IDENTITY_TOKEN=<a superuser's access token> python watch.py 127.0.0.1:50051
    IDENTITY_PASSWORD=... python watch.py --username admin --check 127.0.0.1:50051

The pattern, minimally:

- entries keyed by user id (here: what GetUser returns), filled on a miss;
- a thread reads WatchChanges and evicts the user of every change
  (everything on KEYS_CHANGED), remembering the last cursor;
- the cache is trusted only while the stream has answered (a change or a
  heartbeat) within 2 x CHANGES_HEARTBEAT; when it has not, reads go to the
  service and the stream is cancelled and reopened from the cursor, so no
  change is lost;
- a cursor the service no longer keeps (FAILED_PRECONDITION, reason
  CURSOR_EXPIRED) drops the whole cache and starts again from now.

Without --check it prints every change and eviction until Ctrl-C. With
--check (what run.py runs) it makes changes as the superuser and checks
that the watcher sees each one, evicts, resumes after a lost connection,
and answers fresh values; it exits non-zero when anything else happens.

Stubs: generated from proto/ by run.py into ./generated (see README.md).
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.environ.get("IDENTITY_STUBS", str(Path(__file__).parent / "generated")))
from identity.v1 import (  # noqa: E402
    auth_pb2, auth_pb2_grpc, change_pb2, change_pb2_grpc, user_pb2, user_pb2_grpc,
)

RPC_TIMEOUT = 10.0  # seconds, for every unary call
CHECK_TIMEOUT = 20.0  # seconds the check waits for a change to show


class Failed(Exception):
    """The service did not do what the contract says."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def reason_of(err: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a refusal, or ''."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def kind_name(kind: int) -> str:
    """CHANGE_KIND_USER_UPDATED -> user_updated (the CLI's names)."""
    try:
        name = change_pb2.ChangeKind.Name(kind)
    except ValueError:
        return f"kind_{kind}"
    return name[len("CHANGE_KIND_"):].lower() if name.startswith("CHANGE_KIND_") else name.lower()


class UserCache:
    """Users by id, trusted only while the change feed is heard from.

    `get` answers from memory only while trusted; otherwise (and on a miss)
    it asks the service. An answer read while a change to that user was on
    its way is not kept: every eviction bumps the user's generation, and a
    fill whose generation moved meanwhile is dropped.
    """

    def __init__(self, heartbeat: float):
        self.stale_after = 2 * heartbeat
        self.lock = threading.Lock()
        self.entries: dict[str, user_pb2.User] = {}
        self.generation: dict[str, int] = {}
        self.epoch = 0  # bumped when the whole cache is dropped
        self.cursor = ""  # where the feed resumes
        self.last_heard: float | None = None  # monotonic time of the last response

    def trusted(self) -> bool:
        with self.lock:
            return self.last_heard is not None and time.monotonic() - self.last_heard < self.stale_after

    def get(self, user_id: str, fetch: Callable[[str], user_pb2.User]) -> tuple[user_pb2.User, bool]:
        """(the user, whether it came from memory)."""
        with self.lock:
            fresh = self.last_heard is not None and time.monotonic() - self.last_heard < self.stale_after
            if fresh and user_id in self.entries:
                return self.entries[user_id], True
            seen = (self.epoch, self.generation.get(user_id, 0))
        user = fetch(user_id)  # outside the lock: a call to the service
        with self.lock:
            if fresh and (self.epoch, self.generation.get(user_id, 0)) == seen:
                self.entries[user_id] = user
        return user, False

    def evict(self, user_id: str) -> bool:
        with self.lock:
            self.generation[user_id] = self.generation.get(user_id, 0) + 1
            return self.entries.pop(user_id, None) is not None

    def apply(self, response: change_pb2.WatchChangesResponse) -> list[str]:
        """Evicts what the changes of one response touch; returns what went."""
        gone = []
        for change in response.changes:
            if change.kind == change_pb2.CHANGE_KIND_KEYS_CHANGED:
                gone.extend(self.drop_all())
            elif change.user_id and self.evict(change.user_id):
                gone.append(change.user_id)
            # GROUP_DELETED needs nothing here: each of its members has a
            # MEMBER_REMOVED of their own.
        with self.lock:
            if response.cursor:
                self.cursor = response.cursor
            self.last_heard = time.monotonic()
        return gone

    def drop_all(self) -> list[str]:
        with self.lock:
            gone = list(self.entries)
            self.entries.clear()
            self.generation.clear()
            self.epoch += 1
            return gone

    def reset(self) -> None:
        """CURSOR_EXPIRED: forget everything, start again from now."""
        self.drop_all()
        with self.lock:
            self.cursor = ""
            self.last_heard = None

    def stop_trusting(self) -> None:
        with self.lock:
            self.last_heard = None


class Watcher(threading.Thread):
    """Reads WatchChanges into a UserCache, reconnecting from its cursor."""

    def __init__(self, channel: grpc.Channel, token: str, cache: UserCache,
                 on_change: Callable[[change_pb2.Change], None] = lambda c: None,
                 say: Callable[[str], None] = lambda s: None):
        super().__init__(name="watcher", daemon=True)
        self.stub = change_pb2_grpc.ChangeServiceStub(channel)
        self.metadata = [("authorization", f"Bearer {token}")]
        self.cache = cache
        self.on_change = on_change
        self.say = say
        self.stopped = threading.Event()
        self.fatal: grpc.RpcError | None = None
        self.call = None
        self.call_started = 0.0  # monotonic time the current stream was opened
        self.connects = 0

    def run(self) -> None:
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        backoff = 0.5
        while not self.stopped.is_set():
            try:
                self.call_started = time.monotonic()
                self.call = self.stub.WatchChanges(
                    change_pb2.WatchChangesRequest(after_cursor=self.cache.cursor),
                    metadata=self.metadata)
                self.connects += 1
                for response in self.call:
                    backoff = 0.5
                    for user_id in self.cache.apply(response):
                        self.say(f"evicted {user_id}")
                    for change in response.changes:
                        self.on_change(change)
                self.say("the stream ended (the server shuts down): reconnecting")
            except grpc.RpcError as err:
                self.cache.stop_trusting()
                if self.stopped.is_set():
                    return
                code = err.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION and reason_of(err) == "CURSOR_EXPIRED":
                    self.say("cursor expired: dropping the whole cache, starting from now")
                    self.cache.reset()
                    continue
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.INVALID_ARGUMENT):
                    # A real service would get a new token here; the example stops.
                    self.fatal = err
                    return
                self.say(f"stream failed ({code.name}): resuming after {self.cache.cursor or 'now'}")
            self.cache.stop_trusting()
            self.stopped.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _watchdog(self) -> None:
        """Cancels a stream that has gone quiet, so that `run` reconnects."""
        while not self.stopped.wait(1.0):
            heard = max(self.call_started, self.cache.last_heard or 0.0)
            if self.call is not None and time.monotonic() - heard > self.cache.stale_after:
                self.say("no heartbeat: not trusting the cache, reconnecting")
                self.cache.stop_trusting()
                self.call.cancel()

    def drop_connection(self) -> None:
        """What a network failure would do (used by --check)."""
        if self.call is not None:
            self.call.cancel()

    def stop(self) -> None:
        self.stopped.set()
        if self.call is not None:
            self.call.cancel()


def wait_for(what: str, condition: Callable[[], bool], timeout: float = CHECK_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        expect(time.monotonic() < deadline, f"timed out waiting for {what}")
        time.sleep(0.02)


def next_change(changes: queue.Queue, kind: int, user_id: str) -> change_pb2.Change:
    """The next change of `kind` to `user_id` the watcher saw (others are skipped)."""
    deadline = time.monotonic() + CHECK_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        expect(left > 0, f"the watcher did not see {kind_name(kind)} of {user_id}")
        try:
            change = changes.get(timeout=left)
        except queue.Empty:
            continue
        if change.kind == kind and change.user_id == user_id:
            return change


def check(channel: grpc.Channel, token: str, heartbeat: float) -> None:
    users = user_pb2_grpc.UserServiceStub(channel)
    auth_md = [("authorization", f"Bearer {token}")]
    changes: queue.Queue = queue.Queue()
    cache = UserCache(heartbeat)
    watcher = Watcher(channel, token, cache, on_change=changes.put)
    watcher.start()

    def fetch(user_id: str) -> user_pb2.User:
        return users.GetUser(user_pb2.GetUserRequest(id=user_id), metadata=auth_md,
                             timeout=RPC_TIMEOUT).user

    def update(user_id: str, **fields) -> None:
        users.UpdateUser(user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user_id, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(fields))),
            metadata=auth_md, timeout=RPC_TIMEOUT)

    try:
        # 1. The stream answers at once (a heartbeat from now): trusted.
        wait_for("the first response", cache.trusted)
        print(f"  1 WatchChanges                  open, cursor {cache.cursor}", flush=True)

        # 2. A change made now is seen, with its kind and user.
        name = f"watched-{secrets.token_hex(4)}"
        created = users.CreateUser(user_pb2.CreateUserRequest(
            username=name, email=f"{name}@example.com", password=secrets.token_urlsafe(18)),
            metadata=auth_md, timeout=RPC_TIMEOUT).user
        seen = next_change(changes, change_pb2.CHANGE_KIND_USER_CREATED, created.id)
        expect(len(seen.cursor) == 32, f"an opaque cursor: {seen.cursor!r}")
        print(f"  2 CreateUser seen               {kind_name(seen.kind)} user={seen.user_id}", flush=True)

        # 3. Cached, then evicted by an update, then fresh again.
        _, hit = cache.get(created.id, fetch)
        expect(not hit, "the first read is a miss")
        user, hit = cache.get(created.id, fetch)
        expect(hit and user.username == name, "the second read comes from memory")
        update(created.id, first_name="Watched")
        seen = next_change(changes, change_pb2.CHANGE_KIND_USER_UPDATED, created.id)
        expect(list(seen.fields) == ["first_name"], f"fields of the update: {list(seen.fields)}")
        wait_for("the eviction", lambda: created.id not in cache.entries)
        user, hit = cache.get(created.id, fetch)
        expect(not hit and user.first_name == "Watched", "after the eviction, the new value")
        print(f"  3 UpdateUser evicts             fields={','.join(seen.fields)} -> first_name={user.first_name}",
              flush=True)

        # 4. A lost connection: a change made meanwhile arrives once the
        #    watcher resumes from its cursor.
        connects = watcher.connects
        watcher.drop_connection()
        wait_for("the watcher to notice", lambda: not cache.trusted() or watcher.connects > connects)
        update(created.id, last_name="Resumed")
        seen = next_change(changes, change_pb2.CHANGE_KIND_USER_UPDATED, created.id)
        expect(list(seen.fields) == ["last_name"], f"the change made while away: {list(seen.fields)}")
        expect(watcher.connects > connects, "the watcher reconnected")
        wait_for("trust again", cache.trusted)
        print(f"  4 Resumed after a lost stream   fields={','.join(seen.fields)} (nothing lost)", flush=True)
        expect(watcher.fatal is None, f"the watcher stopped: {watcher.fatal}")
    finally:
        watcher.stop()


def login(channel: grpc.Channel, username: str, password: str) -> str:
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    response = auth.Login(auth_pb2.LoginRequest(login=username, password=password), timeout=RPC_TIMEOUT)
    return response.tokens.access_token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addr", nargs="?", default=os.environ.get("IDENTITY_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--username", default=os.environ.get("IDENTITY_USERNAME"),
                        help="log in as this superuser (password from IDENTITY_PASSWORD); "
                             "else IDENTITY_TOKEN is the access token")
    parser.add_argument("--heartbeat", type=float, default=float(os.environ.get("CHANGES_HEARTBEAT_SECONDS", 10)),
                        help="the server's CHANGES_HEARTBEAT in seconds (default 10)")
    parser.add_argument("--check", action="store_true", help="make changes and check the watcher sees them")
    args = parser.parse_args()

    started = time.monotonic()
    with grpc.insecure_channel(args.addr) as channel:
        try:
            if args.username:
                token = login(channel, args.username, os.environ.get("IDENTITY_PASSWORD", ""))
            else:
                token = os.environ.get("IDENTITY_TOKEN", "")
                expect(bool(token), "set IDENTITY_TOKEN (a superuser's access token) or --username")
            if args.check:
                print(f"identity watcher check -> {args.addr}", flush=True)
                check(channel, token, args.heartbeat)
                print(f"OK: the watcher saw every change ({time.monotonic() - started:.2f}s)", flush=True)
                return 0
            cache = UserCache(args.heartbeat)

            def show(change: change_pb2.Change) -> None:
                print(f"{change.commit_time.ToJsonString()} {kind_name(change.kind)} "
                      f"user={change.user_id or '-'} cursor={change.cursor}", flush=True)

            watcher = Watcher(channel, token, cache, on_change=show,
                              say=lambda s: print(f"# {s}", file=sys.stderr, flush=True))
            watcher.start()
            while watcher.is_alive():
                watcher.join(1.0)
            if watcher.fatal is not None:
                raise watcher.fatal
            return 0
        except grpc.RpcError as err:
            print(f"FAILED: {err.code().name}: {err.details()} {reason_of(err)}".rstrip(), file=sys.stderr)
            return 1
        except Failed as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
