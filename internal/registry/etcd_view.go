package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The registry's local view of the fleet: listed, then kept current by a
// watch on the prefix, so that routing never waits on etcd.

// view is the fleet as last seen through the watch.
type view struct {
	replicas map[string]Replica
	// label -> its tunnels: most labels have one or two, and a slice of
	// them costs a fraction of a map (every replica holds every tunnel of
	// the fleet).
	tunnels map[string][]viewTunnel
	revoked map[string]time.Time
}

type viewTunnel struct {
	key     string // the etcd key; the other fields are substrings of it
	replica string
	cluster string
	mode    string
}

func newView() view {
	return view{replicas: map[string]Replica{}, tunnels: map[string][]viewTunnel{}, revoked: map[string]time.Time{}}
}

// internMode returns the constant for the two modes, so that a view of
// thousands of tunnels does not hold thousands of copies.
func internMode(m string) string {
	switch m {
	case "passthrough":
		return "passthrough"
	case "terminate":
		return "terminate"
	}
	return m
}

// watchLoop lists the prefix into the view and watches from there; when
// the watch ends (compacted, canceled) it lists and watches again. While
// etcd is unreachable the view stays as it was.
func (e *Etcd) watchLoop(ctx context.Context) {
	var bo backoffState
	for {
		rev, err := e.list(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.next()
			e.log.Warn("listing the registry failed, keeping the last view", "err", err, "retry_in", wait)
			if !e.sleep(ctx, wait, nil) {
				return
			}
			continue
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := e.cli.Watch(wctx, e.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		var werr error
		for wr := range wch {
			if werr = wr.Err(); werr != nil {
				break
			}
			bo.reset()
			e.apply(wr.Events)
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		e.m.watchRestarts.Inc()
		wait := bo.next()
		e.log.Warn("registry watch ended, listing again", "err", werr, "revision", rev, "in", wait)
		if !e.sleep(ctx, wait, nil) {
			return
		}
	}
}

// list replaces the view with etcd's keys and returns their revision.
func (e *Etcd) list(ctx context.Context) (int64, error) {
	tctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := e.cli.Get(tctx, e.cfg.Prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("listing %s: %w", e.cfg.Prefix, err)
	}
	v := newView()
	e.log.Debug("listed the registry", "keys", len(resp.Kvs), "revision", resp.Header.Revision)
	for _, kv := range resp.Kvs {
		e.applyOne(&v, true, string(kv.Key), kv.Value)
	}
	e.mu.Lock()
	e.view = v
	n := len(v.replicas)
	first := !e.listedSet
	e.listedSet = true
	e.mu.Unlock()
	e.m.replicas.Set(float64(n))
	if first {
		close(e.listed)
	}
	return resp.Header.Revision, nil
}

func (e *Etcd) apply(evs []*clientv3.Event) {
	e.mu.Lock()
	for _, ev := range evs {
		e.applyOne(&e.view, ev.Type == mvccpb.PUT, string(ev.Kv.Key), ev.Kv.Value)
	}
	n := len(e.view.replicas)
	e.mu.Unlock()
	e.m.replicas.Set(float64(n))
}

// applyOne applies one key's put or delete to v. Keys it cannot parse are
// logged and skipped: one bad key must not stop the view.
func (e *Etcd) applyOne(v *view, put bool, key string, val []byte) {
	rest, ok := strings.CutPrefix(key, e.cfg.Prefix)
	if !ok {
		return
	}
	kind, rest, _ := strings.Cut(rest, "/")
	switch kind {
	case "replicas":
		e.log.Debug("replica key", "id", rest, "put", put)
		if !put {
			delete(v.replicas, rest)
			return
		}
		var r Replica
		if err := json.Unmarshal(val, &r); err != nil {
			e.log.Warn("skipping bad replica key", "key", key, "err", err)
			return
		}
		r.ID = rest
		v.replicas[rest] = r
	case "tunnels":
		// <label>/<replicaID>/<clusterUID>/<agentID>; the label is
		// parsed from the right in case it ever holds a '/'.
		parts := strings.Split(rest, "/")
		if len(parts) < 4 {
			e.log.Warn("skipping bad tunnel key", "key", key)
			return
		}
		n := len(parts)
		label := strings.Join(parts[:n-3], "/")
		ts := v.tunnels[label]
		i := slices.IndexFunc(ts, func(vt viewTunnel) bool { return vt.key == key })
		if !put {
			if i >= 0 {
				ts = slices.Delete(ts, i, i+1)
				if len(ts) == 0 {
					delete(v.tunnels, label)
				} else {
					v.tunnels[label] = slices.Clip(ts)
				}
			}
			return
		}
		var t struct {
			Mode string `json:"mode"`
		}
		if err := json.Unmarshal(val, &t); err != nil {
			e.log.Warn("skipping bad tunnel key", "key", key, "err", err)
			return
		}
		vt := viewTunnel{key: key, replica: parts[n-3], cluster: parts[n-2], mode: internMode(t.Mode)}
		if i >= 0 {
			ts[i] = vt
			return
		}
		v.tunnels[label] = append(ts, vt)
	case "revocations":
		if !put {
			delete(v.revoked, rest)
			return
		}
		var rv revocation
		if err := json.Unmarshal(val, &rv); err != nil {
			// Still revoked: failing closed is the safe side.
			e.log.Warn("revocation key with a bad value, treating as forever", "key", key, "err", err)
		}
		var exp time.Time
		if rv.Expires != 0 {
			exp = time.Unix(rv.Expires, 0)
		}
		v.revoked[rest] = exp
	}
}
