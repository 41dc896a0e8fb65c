package token

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var key = []byte(strings.Repeat("k", 32))

func TestIssueVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tok, claims, err := Issue(key, "abc", "", time.Hour, now)
	require.NoError(t, err)
	assert.Equal(t, "cluster-abc", claims.Subdomain)

	got, err := Verify(key, tok, now.Add(time.Minute))
	require.NoError(t, err)
	assert.Equal(t, claims, got)
	assert.True(t, got.Allows("cluster-abc"))
	assert.True(t, got.Allows("cluster-abc-dashboard"))
	assert.True(t, got.Allows("cluster-abc-vmdashboard"))
	assert.False(t, got.Allows("cluster-abd"))
	assert.False(t, got.Allows("cluster-abc-other"))
}

func TestVerifyRejects(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	good, _, err := Issue(key, "abc", "", time.Hour, now)
	require.NoError(t, err)
	otherKey, _, err := Issue([]byte(strings.Repeat("x", 32)), "abc", "", time.Hour, now)
	require.NoError(t, err)
	body, sig, _ := strings.Cut(strings.TrimPrefix(good, prefix), ".")

	tests := []struct {
		name string
		tok  string
		at   time.Time
		want error
	}{
		{"expired", good, now.Add(2 * time.Hour), ErrExpired},
		{"other key", otherKey, now, ErrBadSignature},
		{"no prefix", "abc", now, ErrMalformed},
		{"no signature", prefix + body, now, ErrMalformed},
		{"bad signature encoding", prefix + body + ".!!", now, ErrMalformed},
		{"payload swapped", prefix + "eyJ1aWQiOiJ4In0." + sig, now, ErrBadSignature},
		{"empty", "", now, ErrMalformed},
		{"non-canonical signature encoding", nonCanonical(good), now, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Verify(key, tc.tok, tc.at)
			require.ErrorIs(t, err, tc.want)
		})
	}
}

// nonCanonical flips an unused low bit of the last base64 character: the
// same signature bytes, spelled differently.
func nonCanonical(tok string) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, tok[len(tok)-1])
	return tok[:len(tok)-1] + string(alphabet[i^1])
}

func TestIssueRejectsShortKey(t *testing.T) {
	_, _, err := Issue([]byte("short"), "abc", "", 0, time.Now())
	require.ErrorContains(t, err, "want at least 32")
}

func TestRevocations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "revoked")
	r := NewRevocations(path)
	revoked, err := r.Revoked("id1")
	require.NoError(t, err)
	assert.False(t, revoked, "missing file revokes nothing")

	require.NoError(t, Revoke(path, "id1", "laptop lost"))
	revoked, err = r.Revoked("id1")
	require.NoError(t, err)
	assert.True(t, revoked)

	require.NoError(t, Revoke(path, "id2", ""))
	revoked, err = r.Revoked("id2")
	require.NoError(t, err)
	assert.True(t, revoked, "appended id is seen without restart")

	require.Error(t, Revoke(path, "bad id", ""))

	// A revocation list that cannot be read must refuse, not let tokens in.
	_, err = NewRevocations(t.TempDir()).Revoked("id1")
	require.ErrorContains(t, err, "reading revocation file")
}

// fixedToken is a validly signed token with a fixed id, so that fuzz
// corpora (cached or checked in) hold the same good token on every run:
// Issue draws a random id, and a good token from an earlier run would look
// forged to a later one.
func fixedToken(now time.Time) string {
	payload := fmt.Sprintf(`{"id":"00112233445566778899aabb","uid":"abc","sub":"cluster-abc","iat":%d,"exp":%d}`,
		now.Unix(), now.Add(time.Hour).Unix())
	body := prefix + base64.RawURLEncoding.EncodeToString([]byte(payload))
	return body + "." + base64.RawURLEncoding.EncodeToString(sign(key, body))
}

func FuzzVerify(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	good := fixedToken(now)
	f.Add(good)
	f.Add("spx1..")
	f.Add("spx1.e30.AAAA")
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := Verify(key, tok, now)
		if err == nil && (c.ClusterUID == "" || c.Subdomain == "") {
			t.Fatalf("accepted token without claims: %q", tok)
		}
		if err == nil && tok != good && strings.TrimSpace(tok) != good {
			// Only a correctly signed token may pass: the fuzzer can't forge HMAC.
			t.Fatalf("accepted forged token %q", tok)
		}
	})
}

// A subdomain ending in a dashboard suffix would own another cluster's
// dashboard label, so it is neither issued nor accepted.
func TestReservedSubdomains(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, sub := range []string{"cluster-abc-dashboard", "cluster-abc-vmdashboard", "x-dashboard"} {
		t.Run(sub, func(t *testing.T) {
			_, _, err := Issue(key, "evil", sub, time.Hour, now)
			require.ErrorContains(t, err, "reserved for dashboards")

			// One signed without the check, as an older relay would have.
			payload, err := json.Marshal(Claims{ID: "id1", ClusterUID: "evil", Subdomain: sub, IssuedAt: now.Unix()})
			require.NoError(t, err)
			body := prefix + base64.RawURLEncoding.EncodeToString(payload)
			tok := body + "." + base64.RawURLEncoding.EncodeToString(sign(key, body))
			_, err = Verify(key, tok, now)
			require.ErrorIs(t, err, ErrMalformed)
			assert.ErrorContains(t, err, "reserved for dashboards")
		})
	}
	// The suffix only counts at the end.
	_, c, err := Issue(key, "ok", "dashboard-team", time.Hour, now)
	require.NoError(t, err)
	assert.True(t, c.Allows("dashboard-team-dashboard"))
}

func TestVerifier(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	now := time.Now()
	good, claims, err := Issue(key, "abc", "", time.Hour, now)
	require.NoError(t, err)
	revoked, revClaims, err := Issue(key, "abc", "", time.Hour, now)
	require.NoError(t, err)
	expired, _, err := Issue(key, "abc", "", time.Minute, now.Add(-time.Hour))
	require.NoError(t, err)
	forged, _, err := Issue([]byte("fedcba9876543210fedcba9876543210"), "abc", "", time.Hour, now)
	require.NoError(t, err)
	file := filepath.Join(t.TempDir(), "revoked")
	require.NoError(t, os.WriteFile(file, []byte(revClaims.ID+"\n"), 0o600))

	tests := []struct {
		name    string
		file    string
		tok     string
		wantErr error
	}{
		{"good", file, good, nil},
		{"revoked", file, revoked, ErrRevoked},
		{"expired", file, expired, ErrExpired},
		{"other key", file, forged, ErrBadSignature},
		{"garbage", file, "nope", ErrMalformed},
		{"no revocation file configured", "", revoked, nil},
		{"revocation file unreadable", t.TempDir(), good, ErrRevocationUnreadable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NewVerifier(key, tc.file).Verify(tc.tok)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				assert.Equal(t, Claims{}, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "abc", got.ClusterUID)
		})
	}
	c, err := NewVerifier(key, file).Verify(good)
	require.NoError(t, err)
	assert.Equal(t, claims, c)
}

func TestIssueRefusesNegativeTTL(t *testing.T) {
	key := bytes.Repeat([]byte("k"), MinKeySize)
	_, _, err := Issue(key, "abc", "", -time.Hour, time.Now())
	assert.ErrorContains(t, err, "negative")
}
