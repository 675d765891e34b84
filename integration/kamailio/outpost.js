// JSON for kamailio-outpost.cfg, run by app_jsdt (Duktape: ECMAScript 5).
//
// The routing script keeps SIP in kamailio.cfg; this file only turns SIP facts into Outpost
// events and Outpost answers into routing facts, because JSON cannot be built or read safely
// with the native script's string operations (a Call-ID may hold a quote or a backslash).
// Every function reads its inputs from $var(...) and writes its outputs to $var(...) or
// $avp(...), as the comments say.

// The register events of one REGISTER, after save() (reference 14.2): every binding of the
// account now held, with its remaining expiry, and `expires_s: 0` for every binding that was
// held before the REGISTER and is not any more (expiry 0, `Contact: *`, a replaced contact).
//   in:  $var(account); contact profiles "before" and "after" from reg_fetch_contacts
//        (either may be absent: $var(before_n), $var(after_n) give their sizes); $TS
//   out: $var(events): a JSON array for POST /v1/events/batch, "" when there is nothing to say
function outpost_register_events() {
    var account = KSR.pv.get("$var(account)");
    var now = parseInt(KSR.pv.get("$TS"), 10);
    var held = {};
    var evs = [];
    var i, uri, expires;
    var after = parseInt(KSR.pv.get("$var(after_n)"), 10) || 0;
    for (i = 0; i < after; i++) {
        uri = KSR.pv.get("$(ulc(after=>addr)[" + i + "])");
        expires = parseInt(KSR.pv.get("$(ulc(after=>expires)[" + i + "])"), 10);
        if (!uri) {
            continue;
        }
        held[uri] = true;
        // usrloc keeps an absolute time; Outpost takes what remains of it.
        var left = expires > now ? expires - now : 0;
        if (left > 0) {
            evs.push(register_event(account, uri, left));
        }
    }
    var before = parseInt(KSR.pv.get("$var(before_n)"), 10) || 0;
    for (i = 0; i < before; i++) {
        uri = KSR.pv.get("$(ulc(before=>addr)[" + i + "])");
        if (uri && !held[uri]) {
            evs.push(register_event(account, uri, 0));
        }
    }
    KSR.pv.sets("$var(events)", evs.length ? JSON.stringify(evs) : "");
}

function register_event(account, contact, expires_s) {
    return {account: account, type: "register", data: {contact: contact, expires_s: expires_s}};
}

// One call event: a call of the account starts or ends.
//   in:  $var(account), $var(call_id), $var(action) ("start" or "end")
//   out: $var(events): a JSON array of one event
function outpost_call_event() {
    var ev = {
        account: KSR.pv.get("$var(account)"),
        type: "call",
        data: {call_id: KSR.pv.get("$var(call_id)"), action: KSR.pv.get("$var(action)")}
    };
    KSR.pv.sets("$var(events)", JSON.stringify([ev]));
}

// The path of an account's state, with the account percent-encoded.
//   in:  $var(account)   out: $var(path)
function outpost_state_path() {
    KSR.pv.sets("$var(path)", "/v1/state/" + encodeURIComponent(KSR.pv.get("$var(account)")));
}

// Reads GET /v1/state/{account}: where the account can be reached, and its calls.
//   in:  $var(resp), the answer's body; $var(limit_default); $var(stale_s)
//   out: $avp(outpost_contact): one value per live binding (soonest to expire last);
//        $var(targets): how many; $var(active): the account's active calls, leaving out those
//        older than $var(stale_s) (a call whose end was never reported, because the proxy that
//        held it died, stops counting then); $var(limit): the account's `call_limit` setting,
//        else $var(limit_default) (0: no limit)
function outpost_read_state() {
    var st;
    var targets = 0;
    var active = 0;
    var limit = parseInt(KSR.pv.get("$var(limit_default)"), 10) || 0;
    var stale_ms = (parseInt(KSR.pv.get("$var(stale_s)"), 10) || 0) * 1000;
    var now_ms = Date.now();
    try {
        st = JSON.parse(KSR.pv.get("$var(resp)"));
    } catch (e) {
        KSR.err("outpost: the state answer is not JSON: " + e + "\n");
        st = {entries: []};
    }
    var entries = st.entries || [];
    for (var i = 0; i < entries.length; i++) {
        var en = entries[i];
        var el = en.element || {};
        if (en.type === "register" && el.contacts) {
            var cs = [];
            for (var c in el.contacts) {
                cs.push([c, el.contacts[c].expires_at_ms || 0]);
            }
            // The binding that lives longest is the freshest; it becomes the request URI.
            cs.sort(function (a, b) { return a[1] - b[1]; });
            for (var k = 0; k < cs.length; k++) {
                KSR.pv.sets("$avp(outpost_contact)", cs[k][0]);
                targets++;
            }
        } else if (en.type === "call" && el.calls) {
            for (var id in el.calls) {
                var since = el.calls[id].since_ms || 0;
                if (!stale_ms || now_ms - since < stale_ms) {
                    active++;
                }
            }
        } else if (en.type === "setting" && el.settings && el.settings.call_limit !== undefined) {
            var l = parseInt(el.settings.call_limit, 10);
            if (!isNaN(l) && l >= 0) {
                limit = l;
            }
        }
    }
    KSR.pv.seti("$var(targets)", targets);
    KSR.pv.seti("$var(active)", active);
    KSR.pv.seti("$var(limit)", limit);
}

// Counts the active calls in the element a call event's answer carries (POST /v1/events/batch
// answers with the merged element: every datacenter's calls this one has heard of).
//   in:  $var(resp); $var(stale_s)   out: $var(active), -1 when the answer cannot be read
function outpost_active_after() {
    var active = -1;
    var stale_ms = (parseInt(KSR.pv.get("$var(stale_s)"), 10) || 0) * 1000;
    var now_ms = Date.now();
    try {
        var answers = JSON.parse(KSR.pv.get("$var(resp)"));
        var calls = (answers[0].element || {}).calls || {};
        active = 0;
        for (var id in calls) {
            var m = calls[id];
            if (m.active === true && (!stale_ms || now_ms - (m.since_ms || 0) < stale_ms)) {
                active++;
            }
        }
    } catch (e) {
        KSR.err("outpost: the call answer is not what was expected: " + e + "\n");
    }
    KSR.pv.seti("$var(active)", active);
}
