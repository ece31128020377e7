DROP TABLE group_members;
DROP TABLE groups;
DROP TABLE login_names;
DROP TABLE users;
-- pg_trgm stays: other schemas of the database may use it.
