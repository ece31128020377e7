-- Users and groups. Canonical forms (NFKC case folds) are computed by the
-- service, not by lower(), whose result depends on the database's locale;
-- they carry the unique indexes. `search` is the folded text that ListUsers'
-- and ListGroups' `query` matches as a substring, through a trigram index.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE users (
    id                  uuid        PRIMARY KEY,
    username            text        NOT NULL,
    username_canonical  text        NOT NULL,
    email               text        NOT NULL,
    email_canonical     text        NOT NULL,
    password_hash       text        NOT NULL,
    first_name          text        NOT NULL DEFAULT '',
    last_name           text        NOT NULL DEFAULT '',
    is_superuser        boolean     NOT NULL DEFAULT false,
    is_active           boolean     NOT NULL DEFAULT true,
    is_verified         boolean     NOT NULL DEFAULT false,
    attributes          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    search              text        NOT NULL,
    password_changed_at timestamptz NOT NULL DEFAULT now(),
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_username_canonical_key UNIQUE (username_canonical),
    CONSTRAINT users_email_canonical_key UNIQUE (email_canonical),
    CONSTRAINT users_attributes_is_object CHECK (jsonb_typeof(attributes) = 'object')
);

CREATE INDEX users_search_trgm ON users USING gin (search gin_trgm_ops);

-- Every name a user logs in with (its canonical username and email), unique
-- across both kinds, so that nobody can take a username equal to another
-- user's email and catch that user's logins by email.
CREATE TABLE login_names (
    name    text PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE
);

CREATE INDEX login_names_user_id ON login_names (user_id);

CREATE TABLE groups (
    id                  uuid        PRIMARY KEY,
    groupname           text        NOT NULL,
    groupname_canonical text        NOT NULL,
    slug                text        NOT NULL,
    search              text        NOT NULL,
    create_time         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT groups_groupname_canonical_key UNIQUE (groupname_canonical),
    CONSTRAINT groups_slug_key UNIQUE (slug)
);

CREATE INDEX groups_search_trgm ON groups USING gin (search gin_trgm_ops);

CREATE TABLE group_members (
    group_id    uuid        NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id)
);

-- ListUserGroups and the user side of the cascade.
CREATE INDEX group_members_user_id ON group_members (user_id, group_id);
