// Package token issues and verifies the tokens agents present to the relay.
// A token binds one cluster uid and its subdomain, is signed with a key only
// the relay holds (HMAC-SHA256, so no database is needed), may expire, and can
// be revoked by id.
package token

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
)

const prefix = "spx1."

// MinKeySize is the shortest signing key accepted.
const MinKeySize = 32

// Errors a caller can tell apart. Every failure wraps one of them.
var (
	ErrMalformed    = errors.New("malformed token")
	ErrBadSignature = errors.New("token signature does not match")
	ErrExpired      = errors.New("token expired")
	ErrRevoked      = errors.New("token revoked")
	// ErrRevocationUnreadable says the revocation list could not be read:
	// the token may be fine, but is not let in on a guess.
	ErrRevocationUnreadable = errors.New("revocation list unreadable")
)

// Claims is what a token asserts.
type Claims struct {
	ID         string `json:"id"`
	ClusterUID string `json:"uid"`
	Subdomain  string `json:"sub"`
	IssuedAt   int64  `json:"iat"`
	ExpiresAt  int64  `json:"exp,omitempty"` // unix seconds; 0 never expires
}

// Labels returns the hostname labels the token allows an agent to register.
func (c Claims) Labels() []string {
	return hostname.Labels(c.Subdomain)
}

// Allows reports whether the token allows registering label.
func (c Claims) Allows(label string) bool {
	for _, l := range c.Labels() {
		if l == label {
			return true
		}
	}
	return false
}

// Issue signs a new token for clusterUID. An empty subdomain means
// "cluster-<uid>"; ttl 0 means the token does not expire.
func Issue(key []byte, clusterUID, subdomain string, ttl time.Duration, now time.Time) (string, Claims, error) {
	if len(key) < MinKeySize {
		return "", Claims{}, fmt.Errorf("signing key is %d bytes, want at least %d", len(key), MinKeySize)
	}
	if clusterUID == "" {
		return "", Claims{}, errors.New("cluster uid is empty")
	}
	if ttl < 0 {
		// A token already expired (or a typo for a positive TTL) would
		// otherwise be printed as "expires never".
		return "", Claims{}, fmt.Errorf("ttl %v is negative (0 means the token never expires)", ttl)
	}
	if subdomain == "" {
		subdomain = hostname.DefaultSubdomain(clusterUID)
	}
	if err := hostname.CheckSubdomain(subdomain); err != nil {
		return "", Claims{}, err
	}
	id := make([]byte, 12)
	if _, err := rand.Read(id); err != nil {
		return "", Claims{}, fmt.Errorf("generating token id: %w", err)
	}
	c := Claims{ID: hex.EncodeToString(id), ClusterUID: clusterUID, Subdomain: subdomain, IssuedAt: now.Unix()}
	if ttl > 0 {
		c.ExpiresAt = now.Add(ttl).Unix()
	}
	payload, err := json.Marshal(c)
	if err != nil {
		return "", Claims{}, fmt.Errorf("encoding claims: %w", err)
	}
	body := prefix + base64.RawURLEncoding.EncodeToString(payload)
	return body + "." + base64.RawURLEncoding.EncodeToString(sign(key, body)), c, nil
}

// strictB64 decodes what Issue encodes and nothing else: the lenient
// decoder ignores the unused low bits of the last character, so four
// different strings carried one signature.
var strictB64 = base64.RawURLEncoding.Strict()

// base64URLOnly reports whether s holds only base64url characters. Even
// the strict decoder skips \r and \n anywhere in its input, so without
// this one signature could be written many ways (FuzzVerify found a
// token with a newline inside its signature accepted).
func base64URLOnly(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func sign(key []byte, body string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(body))
	return m.Sum(nil)
}

// Verify checks tok's signature (in constant time) and expiry and returns its
// claims. Revocation is the Revocations' job.
func Verify(key []byte, tok string, now time.Time) (Claims, error) {
	tok = strings.TrimSpace(tok)
	if !strings.HasPrefix(tok, prefix) || len(tok) > 4096 {
		return Claims{}, fmt.Errorf("%w: want %q prefix", ErrMalformed, prefix)
	}
	dot := strings.LastIndexByte(tok, '.')
	if dot <= len(prefix) {
		return Claims{}, fmt.Errorf("%w: missing signature", ErrMalformed)
	}
	body, sigText := tok[:dot], tok[dot+1:]
	if !base64URLOnly(sigText) {
		return Claims{}, fmt.Errorf("%w: signature encoding: not base64url", ErrMalformed)
	}
	sig, err := strictB64.DecodeString(sigText)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: signature encoding: %v", ErrMalformed, err)
	}
	if !hmac.Equal(sig, sign(key, body)) {
		return Claims{}, ErrBadSignature
	}
	payload, err := strictB64.DecodeString(body[len(prefix):])
	if err != nil {
		return Claims{}, fmt.Errorf("%w: payload encoding: %v", ErrMalformed, err)
	}
	var c Claims
	if err := json.Unmarshal(payload, &c); err != nil {
		return Claims{}, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	if c.ID == "" || c.ClusterUID == "" || c.Subdomain == "" {
		return Claims{}, fmt.Errorf("%w: id, uid and sub are required", ErrMalformed)
	}
	// Tokens signed before the suffixes were reserved must not claim
	// another cluster's dashboard either.
	if err := hostname.CheckSubdomain(c.Subdomain); err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if c.ExpiresAt != 0 && now.Unix() >= c.ExpiresAt {
		return Claims{}, fmt.Errorf("%w at %s", ErrExpired, time.Unix(c.ExpiresAt, 0).UTC().Format(time.RFC3339))
	}
	return c, nil
}

// Verifier checks the tokens agents present: signature and expiry with
// the relay's key, then revocation.
type Verifier struct {
	key     []byte
	revoked *Revocations
	now     func() time.Time
}

// NewVerifier returns a Verifier for key that also honours the revocation
// file at revocationFile (none when empty; see Revocations).
func NewVerifier(key []byte, revocationFile string) *Verifier {
	return &Verifier{key: key, revoked: NewRevocations(revocationFile), now: time.Now}
}

// Verify returns the claims of tok if the relay should accept it. Its
// errors wrap ErrMalformed, ErrBadSignature, ErrExpired, ErrRevoked or
// ErrRevocationUnreadable.
func (v *Verifier) Verify(tok string) (Claims, error) {
	c, err := Verify(v.key, tok, v.now())
	if err != nil {
		return Claims{}, err
	}
	revoked, err := v.revoked.Revoked(c.ID)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrRevocationUnreadable, err)
	}
	if revoked {
		return Claims{}, fmt.Errorf("%w: token %s is revoked", ErrRevoked, c.ID)
	}
	return c, nil
}

// Revoked reports whether the token id is revoked now (re-reading the
// revocation file if it changed). The relay asks it of live sessions, so
// revoking a token also ends the sessions it opened.
func (v *Verifier) Revoked(id string) (bool, error) { return v.revoked.Revoked(id) }

// RevocationFileMissing reports whether a revocation file is configured
// but does not exist (then nothing is revoked, which the relay says loudly
// at start).
func (v *Verifier) RevocationFileMissing() bool {
	if v.revoked.path == "" {
		return false
	}
	_, err := os.Stat(v.revoked.path)
	return errors.Is(err, os.ErrNotExist)
}

// ReadKey reads a signing key file: the raw bytes, trimmed of white space.
func ReadKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading signing key: %w", err)
	}
	b = []byte(strings.TrimSpace(string(b)))
	if len(b) < MinKeySize {
		return nil, fmt.Errorf("signing key %s is %d bytes, want at least %d", path, len(b), MinKeySize)
	}
	return b, nil
}

// NewKey returns a random signing key, printable so it can live in a Secret.
func NewKey() ([]byte, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return []byte(hex.EncodeToString(b)), nil
}

// Revocations is a file of revoked token ids, one per line ('#' comments
// allowed). It is re-read when its modification time or size changes, so
// `token revoke` takes effect on the running relay without a restart.
type Revocations struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	ids     map[string]bool
}

// NewRevocations watches path; an empty path revokes nothing.
func NewRevocations(path string) *Revocations { return &Revocations{path: path} }

// Revoked reports whether id is revoked. A file that cannot be read is an
// error, so a broken revocation list never silently lets tokens in.
func (r *Revocations) Revoked(id string) (bool, error) {
	if r.path == "" {
		return false, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	fi, err := os.Stat(r.path)
	if errors.Is(err, os.ErrNotExist) {
		r.ids = nil
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading revocation file: %w", err)
	}
	if r.ids == nil || !fi.ModTime().Equal(r.modTime) || fi.Size() != r.size {
		ids, err := readIDs(r.path)
		if err != nil {
			return false, err
		}
		r.ids, r.modTime, r.size = ids, fi.ModTime(), fi.Size()
	}
	return r.ids[id], nil
}

func readIDs(path string) (map[string]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading revocation file: %w", err)
	}
	defer f.Close()
	ids := map[string]bool{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		line, _, _ := strings.Cut(s.Text(), "#")
		if line = strings.TrimSpace(line); line != "" {
			ids[line] = true
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("reading revocation file: %w", err)
	}
	return ids, nil
}

// Revoke appends id to the revocation file at path.
func Revoke(path, id, comment string) error {
	if id == "" || strings.ContainsAny(id, "#\n\r ") {
		return fmt.Errorf("token id %q is not valid", id)
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("opening revocation file: %w", err)
	}
	line := id
	if comment != "" {
		line += " # " + strings.ReplaceAll(comment, "\n", " ")
	}
	if _, err := fmt.Fprintln(f, line); err != nil {
		f.Close()
		return fmt.Errorf("writing revocation file: %w", err)
	}
	return f.Close()
}
