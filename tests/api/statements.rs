//! The hand-written statements on the hot paths are prepared once per
//! connection and reused, like the query builder's (see `db::Prepared`).

use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::helpers::TestDb;
use identity::db::{sessions, throttle};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[tokio::test]
async fn the_token_check_and_login_counting_are_prepared_once_per_connection() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    for _ in 0..3 {
        let found = sessions::fresh(&mut conn, Uuid::now_v7(), Uuid::now_v7(), true)
            .await
            .unwrap();
        assert!(found.is_none());
        throttle::claim(&mut conn, "some-key", Uuid::now_v7(), 5, 60.0)
            .await
            .unwrap();
    }
    let prepared: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements \
         WHERE statement NOT LIKE '%pg_prepared_statements%' \
           AND (statement LIKE '%session_live%' OR statement LIKE '%identity_claim_login%')",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(prepared.n, 2, "one prepared statement each, reused");
}
