//! The tables, as diesel sees them. Kept by hand beside `migrations/`; the
//! migration tests fail when the two disagree.

diesel::table! {
    users (id) {
        id -> Uuid,
        username -> Text,
        username_canonical -> Text,
        email -> Text,
        email_canonical -> Text,
        password_hash -> Text,
        first_name -> Text,
        last_name -> Text,
        is_superuser -> Bool,
        is_active -> Bool,
        is_verified -> Bool,
        attributes -> Jsonb,
        search -> Text,
        password_changed_at -> Timestamptz,
        create_time -> Timestamptz,
        update_time -> Timestamptz,
        is_service -> Bool,
    }
}

diesel::table! {
    login_names (name) {
        name -> Text,
        user_id -> Uuid,
    }
}

diesel::table! {
    groups (id) {
        id -> Uuid,
        groupname -> Text,
        groupname_canonical -> Text,
        slug -> Text,
        search -> Text,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    group_members (group_id, user_id) {
        group_id -> Uuid,
        user_id -> Uuid,
        create_time -> Timestamptz,
    }
}

diesel::joinable!(group_members -> groups (group_id));
diesel::joinable!(group_members -> users (user_id));

diesel::table! {
    sessions (id) {
        id -> Uuid,
        user_id -> Uuid,
        refresh_hash -> Bytea,
        refresh_expire_time -> Timestamptz,
        create_time -> Timestamptz,
        refresh_time -> Timestamptz,
        end_time -> Nullable<Timestamptz>,
        end_reason -> Nullable<Text>,
        api_key_id -> Nullable<Uuid>,
        amr -> Array<Text>,
    }
}

diesel::table! {
    totp_factors (user_id) {
        user_id -> Uuid,
        secret -> Bytea,
        pending_expire_time -> Nullable<Timestamptz>,
        confirm_time -> Nullable<Timestamptz>,
        last_used_step -> Nullable<Int8>,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    recovery_codes (user_id, code_hash) {
        user_id -> Uuid,
        code_hash -> Bytea,
        use_time -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    mfa_challenges (challenge_hash) {
        challenge_hash -> Bytea,
        user_id -> Uuid,
        password_changed_at -> Timestamptz,
        expire_time -> Timestamptz,
    }
}

diesel::joinable!(totp_factors -> users (user_id));
diesel::joinable!(recovery_codes -> users (user_id));
diesel::joinable!(mfa_challenges -> users (user_id));

diesel::table! {
    api_keys (id) {
        id -> Uuid,
        user_id -> Uuid,
        display_name -> Text,
        prefix -> Text,
        secret_hash -> Bytea,
        allowed_methods -> Array<Text>,
        create_time -> Timestamptz,
        expire_time -> Nullable<Timestamptz>,
        last_use_time -> Nullable<Timestamptz>,
        revoke_time -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(api_keys -> users (user_id));

diesel::table! {
    retired_refresh_tokens (hash) {
        hash -> Bytea,
        session_id -> Uuid,
        retire_time -> Timestamptz,
    }
}

diesel::table! {
    login_failures (key) {
        key -> Text,
        failures -> Int4,
        locked_until -> Nullable<Timestamptz>,
        refused -> Bool,
        update_time -> Timestamptz,
    }
}

diesel::table! {
    account_tokens (hash) {
        hash -> Bytea,
        purpose -> Text,
        user_id -> Uuid,
        email_canonical -> Text,
        expire_time -> Timestamptz,
        use_time -> Nullable<Timestamptz>,
        create_time -> Timestamptz,
    }
}

diesel::table! {
    login_attempts (id) {
        id -> Uuid,
        key -> Text,
        expire_time -> Timestamptz,
    }
}

/// SQL types diesel does not know.
pub mod sql_types {
    /// PostgreSQL's 64-bit transaction id (`pg_current_xact_id()`).
    #[derive(diesel::sql_types::SqlType, Debug)]
    #[diesel(postgres_type(name = "xid8"))]
    pub struct Xid8;
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::Xid8;

    change_purge (one) {
        one -> Bool,
        xid -> Xid8,
        seq -> Int8,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::Xid8;

    changes (xid, seq) {
        xid -> Xid8,
        seq -> Int8,
        record_time -> Timestamptz,
        kind -> Int2,
        user_id -> Nullable<Uuid>,
        session_id -> Nullable<Uuid>,
        group_id -> Nullable<Uuid>,
        api_key_id -> Nullable<Uuid>,
        actor_id -> Nullable<Uuid>,
        rpc -> Text,
        request_id -> Text,
        fields -> Array<Text>,
        end_reason -> Text,
    }
}

diesel::joinable!(account_tokens -> users (user_id));
diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(login_names -> users (user_id));
diesel::joinable!(retired_refresh_tokens -> sessions (session_id));
diesel::allow_tables_to_appear_in_same_query!(
    users,
    login_names,
    groups,
    group_members,
    sessions,
    retired_refresh_tokens,
    login_failures,
    login_attempts,
    account_tokens,
    change_purge,
    changes,
    api_keys,
    totp_factors,
    recovery_codes,
    mfa_challenges
);
