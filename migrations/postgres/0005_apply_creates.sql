-- Group commit on PostgreSQL: a run of creates that need no read before their write
-- (`write.rs`, `PlannedCreate`), applied in one call rather than three round trips each.
--
-- Operation i is the entity (p_type[i], p_id[i]) in workspace p_ws[i] with body p_body[i], and
-- version p_version[i] with state hash p_hash[i] and one delta (p_pk[i], the body). Its index
-- rows and the parents its foreign keys name are the slices of the row arrays that end at
-- p_*_end[i] (inclusive, 1-based; each slice starts after the previous operation's).
--
-- Each operation runs in its own block with an exception handler, that is its own
-- subtransaction (a savepoint): it writes everything or nothing. The first operation that
-- fails (a parent missing, or any error: a primary or unique key taken raises
-- unique_violation) stops the run. The function then returns, for that operation only:
--   (2, i, SQLSTATE, constraint name, message)
--   (0, i, type, id, NULL) for each of its entity and parents that exists,
--   (1, i, key name, key value, owner id) for each of its keys another entity holds
-- (the same rows as the store's probe, read after its writes were undone), so the store reports
-- the same error as on its other path. No row: every operation applied. Operations after the
-- failed one are not applied (their versions and hashes assumed it would be); the store sends
-- them again with the next version.
--
-- With p_head NULL, the caller's transaction holds the version lock and moves the head. Else
-- the call is a transaction of its own (the statement commits: group commit in one round
-- trip): it takes the version lock, and when the head is not (p_head, p_head_hash), the
-- versions the store assumed, it returns only (3, 0, head, state hash, NULL) and writes
-- nothing; otherwise it moves the head to the last operation applied and notifies, as the
-- store's COMMIT does.
CREATE FUNCTION dp_apply_creates(
    p_type      TEXT[],
    p_id        TEXT[],
    p_ws        TEXT[],
    p_body      TEXT[],
    p_pk        TEXT[],
    p_version   BIGINT[],
    p_hash      TEXT[],
    p_now       BIGINT,
    p_key_end   INT[],
    p_key_name  TEXT[],
    p_key_value TEXT[],
    p_ref_end   INT[],
    p_ref_field TEXT[],
    p_ref_type  TEXT[],
    p_ref_id    TEXT[],
    p_tag_end   INT[],
    p_tag       TEXT[],
    p_par_end   INT[],
    p_par_type  TEXT[],
    p_par_id    TEXT[],
    p_head      BIGINT,
    p_head_hash TEXT
) RETURNS TABLE (r_kind INT, r_op INT, r_a TEXT, r_b TEXT, r_c TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    k0 INT := 1;
    r0 INT := 1;
    t0 INT := 1;
    q0 INT := 1;
    k1 INT;
    r1 INT;
    t1 INT;
    q1 INT;
    v_state TEXT;
    v_constraint TEXT;
    v_message TEXT;
    v_head BIGINT;
    v_head_hash TEXT;
    v_applied INT := 0;
BEGIN
    IF p_head IS NOT NULL THEN
        SELECT version, state_hash INTO v_head, v_head_hash FROM dp_meta WHERE id = 1 FOR UPDATE;
        IF v_head IS DISTINCT FROM p_head OR v_head_hash IS DISTINCT FROM p_head_hash THEN
            RETURN QUERY SELECT 3, 0, v_head::TEXT, v_head_hash, NULL::TEXT;
            RETURN;
        END IF;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_id, 1), 0) LOOP
        k1 := p_key_end[i];
        r1 := p_ref_end[i];
        t1 := p_tag_end[i];
        q1 := p_par_end[i];
        BEGIN
            IF q1 >= q0 AND EXISTS (
                SELECT 1 FROM unnest(p_par_type[q0:q1], p_par_id[q0:q1]) AS q(t, id)
                WHERE NOT EXISTS (SELECT 1 FROM dp_entities e WHERE e.type = q.t AND e.id = q.id)
            ) THEN
                RAISE EXCEPTION 'a parent is missing' USING ERRCODE = 'DP001';
            END IF;
            INSERT INTO dp_entities (type, id, ws_id, body)
                VALUES (p_type[i], p_id[i], p_ws[i], p_body[i]);
            IF k1 >= k0 THEN
                INSERT INTO dp_keys (type, ws_id, name, value, id)
                    SELECT p_type[i], p_ws[i], k.name, k.value, p_id[i]
                    FROM unnest(p_key_name[k0:k1], p_key_value[k0:k1]) AS k(name, value);
            END IF;
            IF r1 >= r0 THEN
                INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id)
                    SELECT r.parent_type, r.parent_id, p_type[i], r.field, p_id[i]
                    FROM unnest(p_ref_field[r0:r1], p_ref_type[r0:r1], p_ref_id[r0:r1])
                        AS r(field, parent_type, parent_id);
            END IF;
            IF t1 >= t0 THEN
                INSERT INTO dp_tags (type, tag, id)
                    SELECT p_type[i], t.tag, p_id[i] FROM unnest(p_tag[t0:t1]) AS t(tag);
            END IF;
            INSERT INTO dp_versions (version, state_hash, created_at, n_deltas)
                VALUES (p_version[i], p_hash[i], p_now, 1);
            INSERT INTO dp_changes (version, seq, type, pk, ws_id, entity)
                VALUES (p_version[i], 0, p_type[i], p_pk[i], p_ws[i], p_body[i]);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE,
                v_constraint = CONSTRAINT_NAME, v_message = MESSAGE_TEXT;
            RETURN QUERY SELECT 2, i, v_state, v_constraint, v_message;
            RETURN QUERY
                SELECT 0, i, e.type, e.id, NULL::TEXT FROM dp_entities e
                WHERE (e.type = p_type[i] AND e.id = p_id[i])
                    OR (e.type, e.id) IN (
                        SELECT q.t, q.id FROM unnest(p_par_type[q0:q1], p_par_id[q0:q1]) AS q(t, id))
                UNION ALL
                SELECT 1, i, d.name, d.value, d.id FROM dp_keys d
                WHERE d.type = p_type[i] AND d.ws_id = p_ws[i]
                    AND (d.name, d.value) IN (
                        SELECT k.name, k.value
                        FROM unnest(p_key_name[k0:k1], p_key_value[k0:k1]) AS k(name, value));
            EXIT;
        END;
        v_applied := i;
        k0 := k1 + 1;
        r0 := r1 + 1;
        t0 := t1 + 1;
        q0 := q1 + 1;
    END LOOP;
    IF p_head IS NOT NULL AND v_applied > 0 THEN
        -- fleet::VERSIONS_CHANNEL, as the store's COMMIT.
        UPDATE dp_meta SET version = p_version[v_applied], state_hash = p_hash[v_applied]
            WHERE id = 1;
        PERFORM pg_notify('deltaplane_versions', p_version[v_applied]::TEXT);
    END IF;
END
$$;
