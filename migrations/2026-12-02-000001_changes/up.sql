-- The change feed (docs/changes.md): every committed change to users,
-- passwords, sessions, groups and memberships, recorded by triggers in the
-- change's own transaction, so that a change made by hand in SQL or by
-- `identity import` is recorded too.
--
-- Order without gaps. Each change row carries its transaction's id
-- (`pg_current_xact_id()`, 64 bits, never reused) and a sequence number;
-- the feed is ordered by (xid, seq). A reader reads only rows whose xid is
-- below the xmin of its snapshot (`pg_snapshot_xmin(pg_current_snapshot())`):
-- every transaction with a lower id has ended by then, so no row can
-- appear later below that line, and a reader that has read everything
-- below it and resumes after its cursor never skips a change. Every reader
-- sees the same order. A transaction that began after another committed
-- has a higher id, so causally ordered changes are in order; concurrent
-- transactions are ordered by id. No lock is taken at commit, so writers
-- commit (and flush) in parallel.
--
-- Waking readers. A transaction run by the service sets
-- identity.announce = 'on', and the service announces its commits itself
-- (a NOTIFY of its own, after the commit, that never holds up a writer);
-- any other transaction (SQL by hand, `identity import`) notifies from the
-- trigger.

-- Every change up to this cursor (xid, seq) has been purged
-- (CHANGES_RETENTION); a reader behind it has missed changes.
CREATE TABLE change_purge (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    xid  xid8    NOT NULL,
    seq  bigint  NOT NULL
);
INSERT INTO change_purge (one, xid, seq) VALUES (true, '0', 0);

CREATE SEQUENCE changes_seq;

-- The changes. `kind` is the number of identity.v1.ChangeKind; `actor_id`,
-- `rpc` and `request_id` come from the transaction-local settings
-- identity.actor_id, identity.rpc and identity.request_id that the service
-- sets at the start of every transaction it runs (empty for SQL by hand).
-- `record_time` is when the change was written (its transaction commits
-- right after).
CREATE TABLE changes (
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    seq         bigint      NOT NULL DEFAULT nextval('changes_seq'),
    record_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        smallint    NOT NULL,
    user_id     uuid,
    session_id  uuid,
    group_id    uuid,
    api_key_id  uuid,
    actor_id    uuid,
    rpc         text        NOT NULL DEFAULT '',
    request_id  text        NOT NULL DEFAULT '',
    fields      text[]      NOT NULL DEFAULT '{}',
    end_reason  text        NOT NULL DEFAULT '',
    PRIMARY KEY (xid, seq)
);

-- A user's history (ListChanges user_id) is found by index; an actor's is
-- a scan of the feed in order (an audit question, not a hot path: one
-- index fewer on every write).
CREATE INDEX changes_user_id ON changes (user_id) WHERE user_id IS NOT NULL;

-- Records one change with the calling transaction's actor, RPC and request id.
CREATE FUNCTION identity_record_change(
    p_kind smallint, p_user uuid, p_session uuid, p_group uuid,
    p_fields text[] DEFAULT '{}', p_end_reason text DEFAULT ''
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (kind, user_id, session_id, group_id, actor_id, rpc, request_id,
                         fields, end_reason)
    VALUES (p_kind, p_user, p_session, p_group,
            NULLIF(current_setting('identity.actor_id', true), '')::uuid,
            COALESCE(current_setting('identity.rpc', true), ''),
            COALESCE(current_setting('identity.request_id', true), ''),
            p_fields, COALESCE(p_end_reason, ''));
    IF current_setting('identity.announce', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('identity_changes', '');
    END IF;
END
$$;

-- users: USER_CREATED (1), USER_UPDATED (2) with the fields that changed,
-- USER_DELETED (3), PASSWORD_CHANGED (4). A rehash at login (same password,
-- new parameters) is no change.
CREATE FUNCTION identity_users_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_fields text[] := '{}';
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM identity_record_change(1::smallint, NEW.id, NULL, NULL);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM identity_record_change(3::smallint, OLD.id, NULL, NULL);
    ELSE
        IF NEW.username IS DISTINCT FROM OLD.username THEN v_fields := v_fields || 'username'::text; END IF;
        IF NEW.email IS DISTINCT FROM OLD.email THEN v_fields := v_fields || 'email'::text; END IF;
        IF NEW.first_name IS DISTINCT FROM OLD.first_name THEN v_fields := v_fields || 'first_name'::text; END IF;
        IF NEW.last_name IS DISTINCT FROM OLD.last_name THEN v_fields := v_fields || 'last_name'::text; END IF;
        IF NEW.is_superuser IS DISTINCT FROM OLD.is_superuser THEN v_fields := v_fields || 'is_superuser'::text; END IF;
        IF NEW.is_active IS DISTINCT FROM OLD.is_active THEN v_fields := v_fields || 'is_active'::text; END IF;
        IF NEW.is_verified IS DISTINCT FROM OLD.is_verified THEN v_fields := v_fields || 'is_verified'::text; END IF;
        IF NEW.attributes IS DISTINCT FROM OLD.attributes THEN v_fields := v_fields || 'attributes'::text; END IF;
        IF cardinality(v_fields) > 0 THEN
            PERFORM identity_record_change(2::smallint, NEW.id, NULL, NULL, v_fields);
        END IF;
        IF NEW.password_changed_at IS DISTINCT FROM OLD.password_changed_at THEN
            PERFORM identity_record_change(4::smallint, NEW.id, NULL, NULL);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_changed AFTER INSERT OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION identity_users_changed();
CREATE TRIGGER users_updated AFTER UPDATE ON users
    FOR EACH ROW WHEN (
        (OLD.username, OLD.email, OLD.first_name, OLD.last_name, OLD.is_superuser,
         OLD.is_active, OLD.is_verified, OLD.attributes, OLD.password_changed_at)
        IS DISTINCT FROM
        (NEW.username, NEW.email, NEW.first_name, NEW.last_name, NEW.is_superuser,
         NEW.is_active, NEW.is_verified, NEW.attributes, NEW.password_changed_at))
    EXECUTE FUNCTION identity_users_changed();

-- sessions: SESSION_STARTED (5), SESSION_ENDED (6) with its reason. A
-- Refresh (a new refresh token, a new refresh time) is no change, and the
-- trigger does not even run for it. A live session deleted (with its user)
-- ends with reason USER_DELETED; the purge of ended sessions is no change.
CREATE FUNCTION identity_sessions_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM identity_record_change(5::smallint, NEW.user_id, NEW.id, NULL);
        IF NEW.end_time IS NOT NULL THEN
            PERFORM identity_record_change(6::smallint, NEW.user_id, NEW.id, NULL,
                                           '{}', NEW.end_reason);
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM identity_record_change(6::smallint, OLD.user_id, OLD.id, NULL,
                                       '{}', 'user_deleted');
    ELSE
        PERFORM identity_record_change(6::smallint, NEW.user_id, NEW.id, NULL,
                                       '{}', NEW.end_reason);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_started AFTER INSERT ON sessions
    FOR EACH ROW EXECUTE FUNCTION identity_sessions_changed();
CREATE TRIGGER sessions_ended AFTER UPDATE ON sessions
    FOR EACH ROW WHEN (OLD.end_time IS NULL AND NEW.end_time IS NOT NULL)
    EXECUTE FUNCTION identity_sessions_changed();
CREATE TRIGGER sessions_deleted AFTER DELETE ON sessions
    FOR EACH ROW WHEN (OLD.end_time IS NULL)
    EXECUTE FUNCTION identity_sessions_changed();

-- groups: GROUP_CREATED (7), GROUP_DELETED (8).
CREATE FUNCTION identity_groups_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM identity_record_change(7::smallint, NULL, NULL, NEW.id);
    ELSE
        PERFORM identity_record_change(8::smallint, NULL, NULL, OLD.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER groups_changed AFTER INSERT OR DELETE ON groups
    FOR EACH ROW EXECUTE FUNCTION identity_groups_changed();

-- group_members: MEMBER_ADDED (9), MEMBER_REMOVED (10), also when a group
-- or a user is deleted with its memberships.
CREATE FUNCTION identity_members_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM identity_record_change(9::smallint, NEW.user_id, NULL, NEW.group_id);
    ELSE
        PERFORM identity_record_change(10::smallint, OLD.user_id, NULL, OLD.group_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER group_members_changed AFTER INSERT OR DELETE ON group_members
    FOR EACH ROW EXECUTE FUNCTION identity_members_changed();
