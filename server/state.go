package server

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/token"
)

// ensureState creates the local CA, certificate and signing key the
// configuration relies on, keeping what already exists.
func (c *Config) ensureState() error {
	if c.StateDir == "" {
		return nil
	}
	caCert, caKey := filepath.Join(c.StateDir, "ca.crt"), filepath.Join(c.StateDir, "ca.key")
	files := map[string][]byte{}
	if c.TLSCertFile == "" {
		var ca *pki.CA
		var err error
		if exists(caCert) && exists(caKey) {
			ca, err = pki.LoadCA(caCert, caKey)
		} else {
			ca, err = pki.NewCA("spectro-proxy relay CA")
			files["ca.crt"], files["ca.key"] = ca.CertPEM, ca.KeyPEM
		}
		if err != nil {
			return err
		}
		c.TLSCertFile, c.TLSKeyFile = filepath.Join(c.StateDir, "tls.crt"), filepath.Join(c.StateDir, "tls.key")
		if !exists(c.TLSCertFile) || len(files) > 0 {
			leaf, err := ca.Issue(c.Domain, []string{c.Domain, "*." + c.Domain, "localhost", "127.0.0.1"}, nil, false)
			if err != nil {
				return err
			}
			files["tls.crt"], files["tls.key"] = leaf.CertPEM, leaf.KeyPEM
		}
	}
	if c.SigningKeyFile == filepath.Join(c.StateDir, StateSigningKey) && !exists(c.SigningKeyFile) {
		k, err := token.NewKey()
		if err != nil {
			return err
		}
		files[StateSigningKey] = k
	}
	if err := pki.WriteFiles(c.StateDir, files); err != nil {
		return fmt.Errorf("writing state dir: %w", err)
	}
	return nil
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }
